"""``edgeft fleet server``: a Flower SuperLink plus edgeft's ServerApp. Entry: :func:`serve`.

:func:`serve` starts ``flower-superlink`` (loopback and insecure unless certificates are given),
submits the edgeft Flower App with ``flwr run`` (Deployment Engine: the SuperLink runs the
ServerApp in its own process), streams its log, and stops the SuperLink when the run ends.

:func:`run_rounds` is the ServerApp's body, run by Flower: each round it waits for the devices,
sends every one the current global adapter, collects their updates until all replied or
``round_timeout`` passed, rejects bad updates (naming the device), aggregates the rest
(``edgeft.fleet.aggregate``), writes ``OUT/round-NNN/adapter`` atomically and ``OUT/history.json``.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgeft.errors import EdgeftError
from edgeft.fleet import aggregate
from edgeft.fleet.procs import (
    check_address,
    flower_env,
    start,
    stop,
    terminate_on_sigterm,
    wait_port,
)
from edgeft.fsutil import atomic_write_json

AGGREGATIONS = ("svd", "stack", "fedavg")
CONFIG_FILE = "fleet-server.json"
HISTORY = "history.json"
DONE_TIMEOUT = 20.0  # seconds the end-of-run message waits for the devices' replies


@dataclass
class ServerConfig:
    bundle: Path
    out: Path
    rounds: int
    min_clients: int
    aggregation: str = "svd"
    address: str = "127.0.0.1:9092"
    eval_data: Path | None = None
    sign_key: Path | None = None
    round_timeout: float = 600.0  # seconds a round waits for updates
    join_timeout: float = 600.0  # seconds a round waits for --min-clients devices
    max_update_norm: float | None = None  # reject updates farther than this from the global (weight space)
    seed: int = 0
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_ca_certfile: Path | None = None
    supernode_auth: bool = False
    progress: bool = True


def serve(cfg: ServerConfig) -> dict:
    """Run the whole federated job; returns the history also written to ``OUT/history.json``."""
    from edgeft.bundle import Bundle

    _check(cfg)
    Bundle.open(cfg.bundle)  # refuse a bad bundle here, not in the ServerApp
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    home = out / ".flwr"
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    settings.update(bundle=str(Path(cfg.bundle).resolve()), out=str(out))
    for key in ("eval_data", "sign_key"):
        if settings[key]:
            settings[key] = str(Path(settings[key]).resolve())
    atomic_write_json(out / CONFIG_FILE, settings)
    app = _write_app(home)
    host, port = cfg.address.rsplit(":", 1)
    env = flower_env(home)
    link_cmd = ["flower-superlink", "--host", host.strip("[]"), "--port", port, "--isolation", "subprocess"]
    link_cmd += ["--disable-runtime-dependency-installation", "--database", str(home / "superlink.db")]
    link_cmd += _tls_args(cfg)
    if cfg.supernode_auth:
        link_cmd.append("--enable-supernode-auth")
    _write_connection(home, cfg)
    log_path = out / "superlink.log"
    terminate_on_sigterm()
    link = start(link_cmd, env, log_path)
    try:
        wait_port(host.strip("[]"), int(port), link, log_path, timeout=120)
        run_cmd = ["flwr", "run", str(app), "edgeft", "--run-config", f"config={json.dumps(str(out / CONFIG_FILE))}"]
        run_cmd.append("--stream")
        budget = cfg.rounds * (cfg.round_timeout + cfg.join_timeout) + 300
        runner = start(run_cmd, env, None if cfg.progress else out / "flwr-run.log")
        try:
            runner.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            raise EdgeftError(f"the federated run took longer than {budget:g} s (rounds x timeouts); stopped") from None
        finally:
            stop(runner)
        history = _read_history(out)
        # `flwr run --stream` returns when the run ends; the history says how it ended.
        deadline = time.monotonic() + 60
        while history.get("status") == "running" and time.monotonic() < deadline:
            time.sleep(0.5)
            history = _read_history(out)
    finally:
        stop(link)
    if history.get("status") != "finished":
        raise EdgeftError(
            f"{out / HISTORY}: the federated run did not finish: {history.get('error') or 'see ' + str(log_path)}"
        )
    return history


def _check(cfg: ServerConfig) -> None:
    if cfg.rounds < 1 or cfg.min_clients < 1:
        raise EdgeftError("--rounds and --min-clients must be at least 1")
    if cfg.aggregation not in AGGREGATIONS:
        raise EdgeftError(f"--aggregation must be one of {', '.join(AGGREGATIONS)}, got {cfg.aggregation!r}")
    if cfg.round_timeout <= 0 or cfg.join_timeout <= 0:
        raise EdgeftError("--round-timeout and --join-timeout must be positive")
    if cfg.max_update_norm is not None and not cfg.max_update_norm > 0:
        raise EdgeftError("--max-update-norm must be positive")
    certs = [cfg.ssl_certfile, cfg.ssl_keyfile, cfg.ssl_ca_certfile]
    if any(certs) and not all(certs):
        raise EdgeftError("TLS needs all three of --ssl-certfile, --ssl-keyfile and --ssl-ca-certfile")
    for p in [*certs, cfg.sign_key, cfg.eval_data]:
        if p is not None and not Path(p).is_file():
            raise EdgeftError(f"{p}: not found")
    if cfg.supernode_auth and not all(certs):
        raise EdgeftError("--supernode-auth needs TLS (--ssl-certfile, --ssl-keyfile, --ssl-ca-certfile)")
    check_address(cfg.address, "--address", tls=all(certs))
    if cfg.sign_key is not None:
        from edgeft.signing import load_private_key

        load_private_key(cfg.sign_key)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise EdgeftError(f"{out}: exists and is not a directory")
    if out.is_dir() and (out / HISTORY).exists():
        raise EdgeftError(f"{out}: already holds a fleet run (history.json); choose another --out")


def _tls_args(cfg: ServerConfig) -> list[str]:
    if cfg.ssl_certfile is None:
        return ["--insecure"]
    return [
        "--ssl-certfile",
        str(cfg.ssl_certfile),
        "--ssl-keyfile",
        str(cfg.ssl_keyfile),
        "--ssl-ca-certfile",
        str(cfg.ssl_ca_certfile),
    ]


def _write_app(home: Path) -> Path:
    """Copy the Flower App (pyproject.toml + the components module) out of the package:
    ``flwr run`` builds its FAB from a directory."""
    import shutil

    app = home / "app"
    shutil.rmtree(app, ignore_errors=True)
    shutil.copytree(Path(__file__).parent / "app", app, ignore=shutil.ignore_patterns("__pycache__"))
    return app


def _write_connection(home: Path, cfg: ServerConfig) -> None:
    """The Flower configuration (FLWR_HOME/config.toml) naming this SuperLink for ``flwr run``."""
    lines = ["[superlink]", 'default = "edgeft"', "", "[superlink.edgeft]", f"address = {json.dumps(cfg.address)}"]
    if cfg.ssl_ca_certfile is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {json.dumps(str(Path(cfg.ssl_ca_certfile).resolve()))}")
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def _read_history(out: Path) -> dict:
    try:
        return json.loads((out / HISTORY).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


# ---------------------------------------------------------------------------------------------
# The ServerApp (runs in the process Flower starts for the run)


def run_rounds(grid, context) -> None:
    """The ServerApp's main: ``context.run_config["config"]`` names ``OUT/fleet-server.json``."""
    settings = json.loads(Path(str(context.run_config["config"])).read_text())
    job = _Job(settings, str(grid.run.run_id) if hasattr(grid, "run") else "0")
    try:
        job.run(grid)
    except Exception as e:
        job.history["status"] = "failed"
        job.history["error"] = str(e) if isinstance(e, EdgeftError) else f"{type(e).__name__}: {e}"
        job.write_history()
        job.log(f"failed: {job.history['error']}")
        raise


class _Job:
    def __init__(self, settings: dict, run_id: str):
        from edgeft.bundle import Bundle
        from edgeft.device.adapter import bundle_scaling, load_adapter
        from edgeft.fleet.updates import bundle_digest, module_ranks, peft_tensors

        self.s = settings
        self.out = Path(settings["out"])
        self.run_id = run_id
        self.bundle = Bundle.open(settings["bundle"])
        self.bundle_sha = bundle_digest(self.bundle)
        self.scaling = bundle_scaling(self.bundle)
        self.ranks = module_ranks(self.bundle)
        init = self.bundle.path(self.bundle.manifest["lora"]["init_adapter"])
        self.global_ = peft_tensors(self.bundle, load_adapter(init, self.bundle))
        self.lost: dict[int, str] = {}  # node -> last_activated_at when it missed a deadline
        self.history: dict = {
            "status": "running",
            "bundle": settings["bundle"],
            "aggregation": settings["aggregation"],
            "rounds_planned": settings["rounds"],
            "run_id": run_id,
            "rounds": [],
        }

    def log(self, text: str) -> None:
        line = f"[edgeft fleet server] {text}"
        print(line, flush=True)
        with open(self.out / "server.log", "a") as f:
            f.write(time.strftime("%Y-%m-%dT%H:%M:%S ") + line + "\n")

    def write_history(self) -> None:
        atomic_write_json(self.out / HISTORY, self.history)

    def run(self, grid) -> None:
        self.write_history()
        self.log(
            f"run {self.run_id}: {self.s['rounds']} rounds, {self.s['aggregation']} aggregation, "
            f"waiting for {self.s['min_clients']} devices"
        )
        for rnd in range(1, self.s["rounds"] + 1):
            self.round(grid, rnd)
        self._say_done(grid)
        self.history["status"] = "finished"
        self.write_history()
        self.log(f"finished: {self.out / HISTORY}")

    def _nodes(self, grid) -> list:
        nodes = [n for n in grid.get_nodes() if getattr(n, "status", "online") in ("", "online")]
        return [n for n in nodes if n.node_id not in self.lost or self.lost[n.node_id] != n.last_activated_at]

    def _wait_for_nodes(self, grid, rnd: int) -> list[int]:
        deadline = time.monotonic() + self.s["join_timeout"]
        nodes = self._nodes(grid)
        while len(nodes) < self.s["min_clients"] and time.monotonic() < deadline:
            time.sleep(0.5)
            nodes = self._nodes(grid)
        if not nodes:
            raise EdgeftError(f"round {rnd}: no device connected within --join-timeout {self.s['join_timeout']:g} s")
        if len(nodes) < self.s["min_clients"]:
            self.log(
                f"round {rnd}: only {len(nodes)} of {self.s['min_clients']} devices after the join timeout; going on"
            )
        return [n.node_id for n in nodes]

    def round(self, grid, rnd: int) -> None:
        from flwr.app import ConfigRecord, Message, RecordDict

        from edgeft.fleet.updates import WIRE_FORMAT, sign

        started = time.monotonic()
        nodes = self._wait_for_nodes(grid, rnd)
        signature = b""
        if self.s["sign_key"]:
            signature = sign(self.s["sign_key"], self.global_, self.run_id, rnd, self.bundle_sha)
        config = {
            "round": rnd,
            "run": self.run_id,
            "bundle_sha256": self.bundle_sha,
            "wire_format": WIRE_FORMAT,
            "signature": signature,
        }
        messages = [
            Message(
                RecordDict({"global": _record(self.global_), "config": ConfigRecord(dict(config))}),
                dst_node_id=node,
                message_type="train",
                group_id=str(rnd),
                ttl=self.s["round_timeout"] + 60,
            )
            for node in nodes
        ]
        sent_bytes = sum(_record_bytes(m.content["global"]) for m in messages)
        self.log(f"round {rnd}: sent the global adapter to {len(nodes)} devices")
        replies = self._collect(grid, messages, rnd, self.s["round_timeout"])
        accepted, rejected, received = self._check(replies, rnd)
        for node in set(nodes) - set(replies):
            info = {n.node_id: n for n in grid.get_nodes()}.get(node)
            self.lost[node] = getattr(info, "last_activated_at", "")
            rejected.append(
                {"client": f"node {node}", "reason": f"no reply within --round-timeout {self.s['round_timeout']:g} s"}
            )
            self.log(f"round {rnd}: node {node}: no reply within --round-timeout; going on without it")
        entry = {
            "round": rnd,
            "clients": [u.client for u in accepted],
            "rejected": rejected,
            "tokens": int(sum(u.tokens for u in accepted)),
            "bytes_sent": sent_bytes,
            "bytes_received": received,
        }
        if accepted:
            entry.update(self._aggregate(accepted, rnd))
        else:
            self.log(f"round {rnd}: no valid update; the global adapter stays as it was")
        entry["seconds"] = round(time.monotonic() - started, 3)
        self.history["rounds"].append(entry)
        self.write_history()

    def _collect(self, grid, messages: list, rnd: int, timeout: float) -> dict[int, object]:
        """Replies by node, until every node replied or ``timeout`` seconds passed.

        Each reply is pulled by its own thread: Flower's ``pull_messages`` waits (up to hours,
        retrying) for the parts of a reply whose sender died while uploading it, and that must
        not hold up the round. A thread still stuck when the round ends is left behind (daemon)."""
        import queue
        import threading

        arrived: queue.Queue = queue.Queue()
        closed = threading.Event()
        deadline = time.monotonic() + timeout

        def pull(message_id: str, node: int) -> None:
            while not closed.is_set() and time.monotonic() < deadline:
                try:
                    got = list(grid.pull_messages([message_id]))
                except Exception as e:  # the SuperLink said no: a failed reply, not a crash of the round
                    self.log(f"round {rnd}: node {node}: pulling its reply failed: {e}")
                    return
                if got:
                    arrived.put((node, got[0]))
                    return
                time.sleep(0.5)

        pending = {mid: m.metadata.dst_node_id for mid, m in zip(grid.push_messages(messages), messages)}
        for mid, node in pending.items():
            threading.Thread(target=pull, args=(mid, node), daemon=True, name=f"pull-{node}").start()
        replies: dict[int, object] = {}
        while len(replies) < len(pending) and (left := deadline - time.monotonic()) > 0:
            try:
                node, reply = arrived.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            replies[node] = reply
        closed.set()
        return replies

    def _check(self, replies: dict, rnd: int) -> tuple[list, list, int]:
        from edgeft.fleet.updates import Rejected, check_update

        accepted, rejected, received = [], [], 0
        for node, reply in sorted(replies.items()):
            name = f"node {node}"
            try:
                if reply.has_error():
                    raise Rejected(f"the device failed: {reply.error.reason}")
                content = reply.content
                meta = dict(content.get("meta", {}))
                name = f"{meta.get('name', '?')} (node {node})"
                if "refused" in meta:
                    raise Rejected(f"the device refused the round: {meta['refused']}")
                if "update" not in content or "metrics" not in content:
                    raise Rejected("the reply has no update or no metrics")
                received += _record_bytes(content["update"])
                tensors = {k: v.numpy() for k, v in content["update"].items()}
                metrics = dict(content["metrics"])
                norm = check_update(
                    tensors, self.global_, self.scaling, metrics.get("tokens"), self.s["max_update_norm"]
                )
            except (Rejected, KeyError, TypeError, ValueError) as e:
                rejected.append({"client": name, "reason": str(e)})
                self.log(f"round {rnd}: rejected the update of {name}: {e}")
                continue
            update = aggregate.Update(name, tensors, int(metrics["tokens"]), float(metrics.get("loss", "nan")), norm)
            accepted.append(update)
            self.log(
                f"round {rnd}: {name}: {int(metrics['tokens'])} tokens, loss {update.loss:.4f}, update norm {norm:.4g}"
            )
        return accepted, rejected, received

    def _aggregate(self, updates: list, rnd: int) -> dict:
        from edgeft.device.adapter import save_adapter
        from edgeft.fleet.updates import onnx_tensors, save_stacked

        results = {
            "svd": aggregate.svd(updates, self.ranks, seed=self.s["seed"] * 1000 + rnd),
            "stack": aggregate.stack(updates),
            "fedavg": aggregate.fedavg(updates),
        }
        errors = {k: aggregate.relative_error(updates, v, self.scaling) for k, v in results.items()}
        method = self.s["aggregation"]
        # The bundle's graphs have fixed LoRA shapes: the stacked adapter (rank Σ r_c) is written
        # for PEFT, and the fleet goes on from its best rank-r approximation, which is svd's.
        self.global_ = results["svd" if method == "stack" else method]
        folder = self.out / f"round-{rnd:03d}"
        save_adapter(folder / "adapter", self.bundle, onnx_tensors(self.bundle, self.global_))
        if method == "stack":
            save_stacked(folder / "adapter-stacked", self.bundle, results["stack"], len(updates))
        w = aggregate.weights(updates)
        entry = {
            "loss": float(sum(wc * u.loss for wc, u in zip(w, updates))),
            "client_losses": {u.client: u.loss for u in updates},
            "update_norms": {u.client: u.norm for u in updates},
            "aggregation_error": errors,
            "adapter": str(folder / "adapter"),
        }
        if self.s.get("eval_data"):
            entry["eval_loss"] = self._evaluate(folder / "adapter")
        shown = ", ".join(f"{k} {v:.3g}" for k, v in errors.items())
        eval_text = f", eval loss {entry['eval_loss']:.4f}" if "eval_loss" in entry else ""
        self.log(
            f"round {rnd}: aggregated {len(updates)} updates ({method}); loss {entry['loss']:.4f}{eval_text}; "
            f"relative error vs the mean update: {shown}"
        )
        return entry

    def _evaluate(self, adapter: Path) -> float:
        from edgeft.device.evaluate import EvalConfig, evaluate

        return evaluate(EvalConfig(Path(self.s["bundle"]), Path(self.s["eval_data"]), adapter=adapter))["loss"]

    def _say_done(self, grid) -> None:
        """Tell the devices the run is over, so ``edgeft fleet client`` exits. Their replies are
        awaited a little (messages of a run that ended are not delivered), not required."""
        from flwr.app import ConfigRecord, Message, RecordDict

        nodes = [n.node_id for n in self._nodes(grid)]
        if nodes:
            done = [{"done": ConfigRecord({"run": self.run_id})} for _ in nodes]
            messages = [
                Message(RecordDict(d), dst_node_id=n, message_type="query", ttl=60) for d, n in zip(done, nodes)
            ]
            self._collect(grid, messages, 0, DONE_TIMEOUT)


def _record(tensors: dict[str, np.ndarray]):
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(np.ascontiguousarray(v, np.float32)) for k, v in tensors.items()})


def _record_bytes(record) -> int:
    return int(sum(len(a.data) for a in record.values()))


def round_table(history: dict) -> str:
    """The per-round table ``edgeft fleet server`` prints at the end."""
    head = f"{'round':>5}  {'clients':>7}  {'rejected':>8}  {'tokens':>7}  {'loss':>7}  {'eval':>7}  "
    head += f"{'KB in':>7}  {'err svd':>8}  {'err stack':>9}  {'err fedavg':>10}"
    lines = [head]
    for r in history.get("rounds", []):
        err = r.get("aggregation_error", {})

        def num(v, fmt):
            return format(v, fmt) if isinstance(v, int | float) else "-"

        lines.append(
            f"{r['round']:>5}  {len(r['clients']):>7}  {len(r['rejected']):>8}  {r['tokens']:>7}  "
            f"{num(r.get('loss'), '7.4f'):>7}  {num(r.get('eval_loss'), '7.4f'):>7}  {r['bytes_received'] / 1024:>7.1f}  "
            f"{num(err.get('svd'), '8.2e'):>8}  {num(err.get('stack'), '9.2e'):>9}  {num(err.get('fedavg'), '10.2e'):>10}"
        )
    return "\n".join(lines)
