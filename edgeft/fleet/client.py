"""``edgeft fleet client``: a Flower SuperNode plus edgeft's ClientApp. Entry: :func:`join`.

:func:`join` starts ``flower-supernode`` towards the server and waits until the server says the
run is over (or ``idle_timeout`` passes without a round), then stops it. Everything the device
keeps lives in ``STATE_DIR``: the SuperNode's FLWR_HOME, one training directory per round with
checkpoints every few steps, and ``rounds.jsonl`` (one line per round it took part in).

:func:`handle_train` is the ClientApp's body, run by Flower in a fresh process for each round: it
checks the global adapter (bundle, wire format and, with a trusted key, its signature), trains it
with edgeft's own engine (``edgeft.device.train``, the settings given to ``edgeft fleet client``)
and replies with the trained tensors, the token count and the mean loss. A round whose training
directory already exists (the device was stopped mid-round and the same round came again)
resumes from its newest checkpoint. A restarted device joins the next round the server starts.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgeft.errors import EdgeftError
from edgeft.fleet.procs import check_address, flower_env, free_port, start, stop, terminate_on_sigterm
from edgeft.fsutil import atomic_write_json

CONFIG_FILE = "fleet-client.json"
ROUNDS_LOG = "rounds.jsonl"
FINISHED = "finished.json"
DONE_GRACE = 5.0


@dataclass
class ClientConfig:
    bundle: Path
    data: Path
    server: str
    state_dir: Path = Path("edgeft-fleet-client")
    name: str | None = None  # how the server's log names this device (default: host name)
    steps_per_round: int = 10
    lr: float = 2e-4
    warmup_steps: int = 0
    batch_size: int = 4
    grad_accum: int = 1
    max_seq_len: int | None = None
    seed: int = 0
    save_every: int = 5  # checkpoint every N steps within a round (resume after a restart)
    truncate: bool = False
    threads: int | None = None
    trusted_key: Path | None = None  # global adapters must be signed by this key
    root_certificates: Path | None = None  # the server's CA: TLS
    auth_key: Path | None = None  # this device's SuperNode key (Flower node authentication)
    idle_timeout: float | None = None  # stop when no round came for this long (default: wait)
    progress: bool = True


def join(cfg: ClientConfig) -> dict:
    """Take part in the server's run until it ends; returns ``{"rounds": [...]}`` (this device's)."""
    _check(cfg)
    state = Path(cfg.state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    (state / FINISHED).unlink(missing_ok=True)
    settings = {k: (str(Path(v).resolve()) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    settings.update(state_dir=str(state), name=cfg.name or os.uname().nodename)
    atomic_write_json(state / CONFIG_FILE, settings)
    env = flower_env(state / "flwr")
    cmd = ["flower-supernode", "--superlink", cfg.server, "--host", "127.0.0.1", "--port", str(free_port())]
    cmd += ["--node-config", f"config={json.dumps(str(state / CONFIG_FILE))}"]
    if cfg.root_certificates is None:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(Path(cfg.root_certificates).resolve())]
    if cfg.auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(Path(cfg.auth_key).resolve())]
    log_path = state / "supernode.log"
    seen = _rounds(state)
    terminate_on_sigterm()
    node = start(cmd, env, log_path)
    _say(cfg, f"joined {cfg.server} as {settings['name']} (Flower log: {log_path})")
    last = time.monotonic()
    try:
        while not (state / FINISHED).exists():
            if node.poll() is not None:
                raise EdgeftError(f"flower-supernode exited with code {node.returncode}; see {log_path}")
            rounds = _rounds(state)
            for entry in rounds[len(seen) :]:
                _say(cfg, _describe(entry))
                last = time.monotonic()
            seen = rounds
            if cfg.idle_timeout is not None and time.monotonic() - last > cfg.idle_timeout:
                raise EdgeftError(f"no round from {cfg.server} in {cfg.idle_timeout:g} s (--idle-timeout); stopped")
            time.sleep(0.5)
        for entry in _rounds(state)[len(seen) :]:
            _say(cfg, _describe(entry))
        time.sleep(DONE_GRACE)  # let the SuperNode upload the reply to the end-of-run message
    finally:
        stop(node)
    _say(cfg, "the server ended the run")
    return {"rounds": _rounds(state)}


def _check(cfg: ClientConfig) -> None:
    from edgeft.bundle import Bundle

    check_address(cfg.server, "--server", tls=cfg.root_certificates is not None)
    if cfg.steps_per_round < 1 or cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise EdgeftError("--steps-per-round, --batch-size and --grad-accum must be at least 1")
    if cfg.lr <= 0 or cfg.save_every < 0:
        raise EdgeftError("--lr must be positive and --save-every not negative")
    if cfg.auth_key is not None and cfg.root_certificates is None:
        raise EdgeftError("--auth-key (Flower node authentication) needs TLS: give --root-certificates")
    for p in (cfg.data, cfg.trusted_key, cfg.root_certificates, cfg.auth_key):
        if p is not None and not Path(p).is_file():
            raise EdgeftError(f"{p}: not found")
    if cfg.trusted_key is not None:
        from edgeft.signing import load_public_key

        load_public_key(cfg.trusted_key)
    Bundle.open(cfg.bundle)


def _rounds(state: Path) -> list[dict]:
    try:
        lines = (state / ROUNDS_LOG).read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return out


def _describe(entry: dict) -> str:
    if "refused" in entry:
        return f"round {entry['round']}: refused: {entry['refused']}"
    return (
        f"round {entry['round']}: trained {entry['steps']} steps on {entry['tokens']} tokens, "
        f"loss {entry['loss']:.4f}, sent {entry['bytes_sent']} bytes ({entry['seconds']:.1f} s)"
    )


def _say(cfg: ClientConfig, text: str) -> None:
    if cfg.progress:
        print(f"[edgeft fleet client] {text}", flush=True)


# ---------------------------------------------------------------------------------------------
# The ClientApp (runs in the process Flower starts for each message)


def handle_train(msg, context):
    """Train the received global adapter for ``steps_per_round`` steps; reply with the update."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    settings = json.loads(Path(str(context.node_config["config"])).read_text())
    state = Path(settings["state_dir"])
    config = dict(msg.content["config"])
    rnd = int(config.get("round", 0))
    started = time.monotonic()
    try:
        tensors = {k: v.numpy() for k, v in msg.content["global"].items()}
        trained, summary = _train_round(settings, config, tensors)
    except EdgeftError as e:
        _append(state, {"round": rnd, "refused": str(e)})
        print(f"[edgeft fleet client] round {rnd}: refused: {e}", flush=True)
        return Message(RecordDict({"meta": ConfigRecord({"name": settings["name"], "refused": str(e)})}), reply_to=msg)
    trained = _test_corruption(trained, rnd)
    from edgeft.fleet.server import _record, _record_bytes

    update = _record(trained)
    losses = summary["losses"]
    metrics = {"tokens": int(summary["tokens"]), "loss": float(np.mean(losses)), "steps": int(summary["steps"])}
    entry = {"round": rnd, **metrics, "bytes_sent": _record_bytes(update), "seconds": time.monotonic() - started}
    _append(state, entry)
    print(f"[edgeft fleet client] {_describe(entry)}", flush=True)
    content = RecordDict(
        {"update": update, "metrics": MetricRecord(metrics), "meta": ConfigRecord({"name": settings["name"]})}
    )
    return Message(content, reply_to=msg)


def handle_done(msg, context):
    """The server's end-of-run message: mark it so :func:`join` stops the SuperNode."""
    from flwr.app import Message, RecordDict

    settings = json.loads(Path(str(context.node_config["config"])).read_text())
    atomic_write_json(Path(settings["state_dir"]) / FINISHED, dict(msg.content["done"]))
    return Message(RecordDict({}), reply_to=msg)


def _train_round(settings: dict, config: dict, tensors: dict) -> tuple[dict, dict]:
    from edgeft.bundle import Bundle
    from edgeft.device.adapter import save_adapter
    from edgeft.device.train import TrainConfig, train
    from edgeft.fleet.updates import WIRE_FORMAT, bundle_digest, check_signature, onnx_tensors, peft_tensors

    bundle = Bundle.open(settings["bundle"])
    rnd, run = int(config["round"]), str(config["run"])
    if config.get("wire_format") != WIRE_FORMAT:
        raise EdgeftError(f"round {rnd}: wire format {config.get('wire_format')!r}, this edgeft speaks {WIRE_FORMAT}")
    if config.get("bundle_sha256") != bundle_digest(bundle):
        raise EdgeftError(f"round {rnd}: the server's bundle differs from {settings['bundle']} (manifest sha256)")
    expected = {p["key"]: tuple(p["shape"]) for p in bundle.trainable}
    if {k: tuple(v.shape) for k, v in tensors.items()} != expected:
        raise EdgeftError(f"round {rnd}: the global adapter's tensors do not fit {settings['bundle']}")
    if settings.get("trusted_key"):
        check_signature(settings["trusted_key"], config.get("signature"), tensors, run, rnd, bundle_digest(bundle))
    work = Path(settings["state_dir"]) / "rounds" / f"run-{run}" / f"round-{rnd:03d}"
    save_adapter(work / "global", bundle, onnx_tensors(bundle, tensors))
    cfg = TrainConfig(
        bundle=Path(settings["bundle"]),
        data=Path(settings["data"]),
        out=work / "train",
        init_adapter=work / "global",
        max_steps=settings["steps_per_round"],
        lr=settings["lr"],
        warmup_steps=settings["warmup_steps"],
        batch_size=settings["batch_size"],
        grad_accum=settings["grad_accum"],
        max_seq_len=settings["max_seq_len"],
        seed=settings["seed"] * 100003 + rnd,  # a fresh shuffle of the local data each round
        save_every=settings["save_every"],
        resume=True,  # a round started before a restart goes on from its newest checkpoint
        truncate=settings["truncate"],
        threads=settings["threads"],
        progress=False,
    )
    summary = train(cfg)
    from edgeft.device.adapter import load_adapter

    trained = peft_tensors(bundle, load_adapter(work / "train" / "adapter", bundle))
    return trained, summary


def _append(state: Path, entry: dict) -> None:
    with open(state / ROUNDS_LOG, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _test_corruption(tensors: dict, rnd: int) -> dict:
    """Test-only hook, unset in real use: ``EDGEFT_TEST_FLEET_CORRUPT=KIND`` (nan, inf, shape,
    norm or keys) makes this device send a broken update, so the tests can check the server
    rejects it and the round goes on."""
    kind = os.environ.get("EDGEFT_TEST_FLEET_CORRUPT")
    if not kind:
        return tensors
    out = dict(tensors)
    first = sorted(out)[0]
    if kind in ("nan", "inf"):
        out[first] = out[first].copy()
        out[first].flat[0] = np.nan if kind == "nan" else np.inf
    elif kind == "shape":
        out[first] = out[first][:-1]
    elif kind == "norm":
        out = {k: v * np.float32(1e4) for k, v in out.items()}
    elif kind == "keys":
        out[first + ".extra"] = out.pop(first)
    return out
