"""The components of the edgeft fleet Flower App; the logic is in ``edgeft.fleet``."""

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from edgeft.fleet.client import handle_done, handle_train
from edgeft.fleet.server import run_rounds

server = ServerApp()
server.main()(run_rounds)

client = ClientApp()
client.train()(handle_train)
client.query()(handle_done)
