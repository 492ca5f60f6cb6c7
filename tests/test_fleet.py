"""edgeft fleet: federated fine-tuning of the adapter over Flower (tests for issue #15).

The aggregation maths and the update / signature checks run here, in the host venv. The fleet
itself runs as real processes from the torch-free device venv (EDGEFT_DEVICE_VENV, which `make
test` builds with the `device` and `fleet` extras): `edgeft fleet server` (a Flower SuperLink and
the ServerApp) and three `edgeft fleet client` devices (SuperNodes and ClientApps), on loopback.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA

from edgeft.errors import EdgeftError
from edgeft.fleet import aggregate
from edgeft.fleet.aggregate import Update

VENV = os.environ.get("EDGEFT_DEVICE_VENV")
STATES = {0: ("ok", "worn"), 1: ("failed",), 2: ("noisy",)}  # each device sees only these states
SETTINGS = ["--lr", "1e-2", "--batch-size", "8", "--threads", "1", "--no-progress"]


# ---------------------------------------------------------------------------------------------
# Aggregation


def _updates(rng, clients=3, r=4, out=24, inp=20, modules=("m.l0.q", "m.l1.v")) -> list[Update]:
    """Non-IID-like updates: every client's B A points somewhere else."""
    ups = []
    for c in range(clients):
        t = {}
        for m in modules:
            t[m + ".lora_A.weight"] = rng.standard_normal((r, inp)).astype(np.float32)
            t[m + ".lora_B.weight"] = rng.standard_normal((out, r)).astype(np.float32)
        ups.append(Update(f"c{c}", t, tokens=100 * (c + 1)))
    return ups


def _dense_mean(ups: list[Update], module: str) -> np.ndarray:
    w = aggregate.weights(ups)
    return sum(
        wc * u.tensors[module + ".lora_B.weight"].astype(np.float64) @ u.tensors[module + ".lora_A.weight"]
        for wc, u in zip(w, ups)
    )


def test_svd_is_the_best_rank_r_approximation_and_beats_fedavg():
    ups = _updates(np.random.default_rng(0))
    scaling = {"m.l0.q": 2.0, "m.l1.v": 0.5}
    merged = aggregate.svd(ups)
    err2 = norm2 = 0.0
    for m, s in scaling.items():
        mean = _dense_mean(ups, m)
        u, sv, vt = np.linalg.svd(mean)
        best = (u[:, :4] * sv[:4]) @ vt[:4]  # Eckart-Young: the best rank-4 approximation
        got = merged[m + ".lora_B.weight"].astype(np.float64) @ merged[m + ".lora_A.weight"]
        assert np.abs(got - best).max() <= 1e-5 * np.abs(best).max()
        # balanced factors: B and A carry the same singular values
        np.testing.assert_allclose(
            np.linalg.norm(merged[m + ".lora_B.weight"], axis=0),
            np.linalg.norm(merged[m + ".lora_A.weight"], axis=1),
            rtol=1e-4,
        )
        err2 += s * s * np.linalg.norm(mean - best) ** 2
        norm2 += s * s * np.linalg.norm(mean) ** 2
    errors = {
        k: aggregate.relative_error(ups, f(ups), scaling)
        for k, f in [("svd", aggregate.svd), ("stack", aggregate.stack), ("fedavg", aggregate.fedavg)]
    }
    assert errors["svd"] == pytest.approx(np.sqrt(err2 / norm2), rel=1e-5)
    assert errors["stack"] < 1e-6
    assert errors["svd"] < errors["fedavg"]
    stacked = aggregate.stack(ups)
    assert stacked["m.l0.q.lora_A.weight"].shape == (12, 20) and stacked["m.l0.q.lora_B.weight"].shape == (24, 12)


def test_svd_keeps_empty_directions_trainable():
    """Round one from B = 0 (or any mean update of rank < r): B = 0, exactly the mean, and A rows
    that are not zero (A = B = 0 would get zero gradients forever)."""
    ups = _updates(np.random.default_rng(1))
    for u in ups:
        for k in u.tensors:
            if ".lora_B." in k:
                u.tensors[k][:] = 0
    ups[0].tensors["m.l0.q.lora_B.weight"][:, 0] = 1.0  # a rank-1 mean in one module
    merged = aggregate.svd(ups)
    assert aggregate.relative_error(ups, merged, {"m.l0.q": 1.0, "m.l1.v": 1.0}) < 1e-6
    for m in ("m.l0.q", "m.l1.v"):
        a = merged[m + ".lora_A.weight"]
        assert (np.linalg.norm(a, axis=1) > 0.1).all()
        np.testing.assert_allclose(a @ a.T - np.diag(np.diag(a @ a.T)), 0, atol=1e-3)  # orthogonal rows


def test_dora_magnitudes_are_token_weighted_means():
    ups = _updates(np.random.default_rng(2), clients=2)
    for i, u in enumerate(ups):
        u.tensors["m.l0.q.lora_magnitude_vector"] = np.full(24, float(i + 1), np.float32)
    for f in (aggregate.svd, aggregate.stack, aggregate.fedavg):
        np.testing.assert_allclose(f(ups)["m.l0.q.lora_magnitude_vector"], 1 / 3 + 2 * 2 / 3, rtol=1e-6)


def test_stacked_adapter_loads_in_peft_and_equals_the_mean(factory, tmp_path):
    """The exact `stack` adapter (rank 3 r) is a PEFT adapter whose ΔW is the mean update."""
    from helpers import torch_peft_model

    from edgeft.bundle import Bundle
    from edgeft.device.adapter import bundle_scaling, load_adapter
    from edgeft.fleet.updates import peft_tensors, save_stacked

    # the same bundle as test_adapter_methods' rsLoRA case (exported once): rsLoRA, rank and alpha patterns
    options = dict(use_rslora=True, rank_pattern={"q_proj": 4}, alpha_pattern={"o_proj": 32})
    bundle = Bundle.open(factory.bundle("llama", **options))
    start = peft_tensors(bundle, load_adapter(bundle.path("adapter"), bundle))
    rng = np.random.default_rng(3)
    ups = [
        Update(f"c{c}", {k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32) for k, v in start.items()}, 10 + c)
        for c in range(3)
    ]
    save_stacked(tmp_path / "stacked", bundle, aggregate.stack(ups), len(ups))
    model = torch_peft_model(factory.model("llama"), tmp_path / "stacked")
    scaling = bundle_scaling(bundle)
    for module in aggregate.modules(start):
        layer = model.get_submodule(module)
        got = layer.get_delta_weight("default").detach().numpy()
        np.testing.assert_allclose(got, scaling[module] * _dense_mean(ups, module), rtol=1e-4, atol=1e-6)


def test_update_checks_name_what_is_wrong():
    from edgeft.fleet.updates import Rejected, check_update

    ups = _updates(np.random.default_rng(4), clients=1)
    start = ups[0].tensors
    scaling = {"m.l0.q": 1.0, "m.l1.v": 1.0}
    good = {k: v + np.float32(0.01) for k, v in start.items()}
    assert check_update(good, start, scaling, 10, None) > 0
    key = "m.l0.q.lora_A.weight"
    cases = {
        "NaN or Inf": {**good, key: np.full_like(good[key], np.nan)},
        "expected float32": {**good, key: good[key][:, :-1]},
        "wrong keys": {k + ("x" if k == key else ""): v for k, v in good.items()},
    }
    for reason, tensors in cases.items():
        with pytest.raises(Rejected, match=reason):
            check_update(tensors, start, scaling, 10, None)
    with pytest.raises(Rejected, match="float32"):
        check_update({**good, key: good[key].astype(np.float64)}, start, scaling, 10, None)
    with pytest.raises(Rejected, match="above the bound"):
        check_update({k: v * np.float32(100) for k, v in good.items()}, start, scaling, 10, 50.0)
    for tokens in (0, -3, 1.5, "7", None, True):
        with pytest.raises(Rejected, match="token count"):
            check_update(good, start, scaling, tokens, None)


def test_signed_globals_refuse_tampering_replay_and_missing_signatures(tmp_path):
    from edgeft.fleet.updates import check_signature, sign
    from edgeft.signing import keygen

    private, public = keygen(tmp_path / "fleet.key")
    _, other = keygen(tmp_path / "other.key")
    tensors = _updates(np.random.default_rng(5), clients=1)[0].tensors
    sig = sign(private, tensors, "run-7", 2, "bundle-sha")
    check_signature(public, sig, tensors, "run-7", 2, "bundle-sha")
    altered = {k: v.copy() for k, v in tensors.items()}
    altered["m.l1.v.lora_B.weight"].flat[3] += np.float32(1e-3)
    for args, match in [
        ((public, sig, altered, "run-7", 2, "bundle-sha"), "bad signature"),
        ((public, sig, tensors, "run-7", 3, "bundle-sha"), "bad signature"),  # an old round replayed
        ((public, sig, tensors, "run-8", 2, "bundle-sha"), "bad signature"),  # another run
        ((public, sig, tensors, "run-7", 2, "other-bundle"), "bad signature"),
        ((other, sig, tensors, "run-7", 2, "bundle-sha"), "bad signature"),
        ((public, b"", tensors, "run-7", 2, "bundle-sha"), "unsigned"),
    ]:
        with pytest.raises(EdgeftError, match=match):
            check_signature(*args)


def test_train_starts_from_init_adapter(llama_bundle, tmp_path):
    """TrainConfig.init_adapter: the run starts from that adapter (its eval loss before training
    is that adapter's), and resuming refuses another init adapter."""
    from edgeft.device.evaluate import EvalConfig, evaluate
    from edgeft.device.train import TrainConfig, train

    first = tmp_path / "first"
    train(TrainConfig(llama_bundle, DATA / "train.jsonl", first, max_steps=3, lr=1e-2, progress=False, save_every=1))
    want = evaluate(EvalConfig(llama_bundle, DATA / "eval.jsonl", adapter=first / "adapter"))["loss"]
    cfg = TrainConfig(
        llama_bundle,
        DATA / "train.jsonl",
        tmp_path / "second",
        eval_data=DATA / "eval.jsonl",
        init_adapter=first / "adapter",
        max_steps=2,
        progress=False,
        save_every=1,
    )
    summary = train(cfg)
    assert summary["eval_loss_before"] == pytest.approx(want, rel=1e-6)
    cfg.init_adapter, cfg.resume, cfg.max_steps = Path(llama_bundle) / "adapter", True, 2
    with pytest.raises(EdgeftError, match="init_adapter_sha256"):
        train(cfg)


# ---------------------------------------------------------------------------------------------
# Real Flower processes on loopback

needs_fleet_venv = pytest.mark.skipif(not VENV, reason="EDGEFT_DEVICE_VENV not set (make test sets it)")


@pytest.fixture(scope="module")
def non_iid(tmp_path_factory) -> dict[int, Path]:
    """train.jsonl split by the equipment state a sample talks about: disjoint, non-IID parts."""
    root = tmp_path_factory.mktemp("fleet-data")
    rows = [json.loads(line) for line in (DATA / "train.jsonl").read_text().splitlines()]
    parts = {}
    for client, states in STATES.items():
        mine = [r for r in rows if any(f" is {s}" in json.dumps(r) for s in states)]
        parts[client] = root / f"device-{client}.jsonl"
        parts[client].write_text("".join(json.dumps(r) + "\n" for r in mine))
    assert sum(len(p.read_text().splitlines()) for p in parts.values()) == len(rows)
    return parts


class _Fleet:
    """Processes started by a test, each in its own process group; all killed at the end."""

    def __init__(self, root: Path):
        self.root, self.procs = root, []
        bin_dir = Path(VENV) / "bin"
        if not (bin_dir / "flower-superlink").exists():
            pytest.fail(f"{VENV} has no Flower; rebuild it: make device-venv (the fleet extra)", pytrace=False)
        self.edgeft = str(bin_dir / "edgeft")
        self.env = dict(os.environ, OMP_NUM_THREADS="1", FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")

    def start(self, name: str, *args, env: dict | None = None) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [self.edgeft, "fleet", *map(str, args)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**self.env, **(env or {})},
            start_new_session=True,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def kill(self, proc: subprocess.Popen) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def close(self) -> None:
        for proc in self.procs:
            self.kill(proc)


@pytest.fixture
def fleet(tmp_path):
    f = _Fleet(tmp_path)
    yield f
    f.close()


def _client(fleet, bundle, data, port, i, *extra, env=None):
    return fleet.start(
        f"client{i}",
        "client",
        bundle,
        "--data",
        data,
        "--server",
        f"127.0.0.1:{port}",
        "--state-dir",
        fleet.root / f"device-{i}",
        "--name",
        f"dev{i}",
        "--idle-timeout",
        600,
        *SETTINGS,
        *extra,
        env=env,
    )


def _wait(proc: subprocess.Popen, fleet: _Fleet, name: str, timeout: float) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name} still running after {timeout:g} s:\n{fleet.log(name)[-3000:]}")
    assert proc.returncode == 0, fleet.log(name)[-3000:]


@needs_fleet_venv
def test_fleet_learns_what_no_device_learns_alone(llama_bundle, non_iid, fleet):
    """Three devices with disjoint parts of the task, three rounds of 10 steps: the aggregated
    adapter's eval loss on the union is below each device's adapter trained alone for 30 steps,
    and svd is closer to the true mean update than fedavg in every round (stack: exact)."""
    from edgeft.device.evaluate import EvalConfig, evaluate
    from edgeft.device.train import TrainConfig, train
    from edgeft.fleet.procs import free_port

    port, out = free_port(), fleet.root / "server"
    server = fleet.start(
        "server", "server", llama_bundle, "--rounds", 3, "--min-clients", 3, "--out", out,
        "--address", f"127.0.0.1:{port}", "--eval-data", DATA / "eval.jsonl",
        "--round-timeout", 300, "--join-timeout", 300,
    )  # fmt: skip
    clients = [_client(fleet, llama_bundle, non_iid[i], port, i, "--steps-per-round", 10) for i in range(3)]
    _wait(server, fleet, "server", 900)
    for i, c in enumerate(clients):
        _wait(c, fleet, f"client{i}", 120)

    history = json.loads((out / "history.json").read_text())
    assert history["status"] == "finished" and len(history["rounds"]) == 3
    from safetensors.numpy import load_file

    raw = sum(t.nbytes for t in load_file(str(Path(llama_bundle) / "adapter" / "adapter_model.safetensors")).values())
    for r in history["rounds"]:
        assert sorted(c.split(" ")[0] for c in r["clients"]) == ["dev0", "dev1", "dev2"] and not r["rejected"]
        err = r["aggregation_error"]
        assert err["stack"] < 1e-5 and err["svd"] < err["fedavg"], err
        assert r["tokens"] > 0 and 3 * raw <= r["bytes_received"] < 1.1 * 3 * raw  # the tensors, little else
    assert "err svd" in fleet.log("server")  # the per-round table
    final = out / "round-003" / "adapter"
    fleet_loss = evaluate(EvalConfig(llama_bundle, DATA / "eval.jsonl", adapter=final))["loss"]
    assert fleet_loss == pytest.approx(history["rounds"][-1]["eval_loss"], rel=1e-5)
    alone = {}
    for i in range(3):
        run = fleet.root / f"alone-{i}"
        train(TrainConfig(llama_bundle, non_iid[i], run, max_steps=30, lr=1e-2, batch_size=8, progress=False))
        alone[i] = evaluate(EvalConfig(llama_bundle, DATA / "eval.jsonl", adapter=run / "adapter"))["loss"]
    assert fleet_loss < min(alone.values()), (fleet_loss, alone)
    for i in range(3):  # each device's own record, one line per round
        rounds = [json.loads(x) for x in (fleet.root / f"device-{i}" / "rounds.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rounds] == [1, 2, 3] and all(r["steps"] == 10 for r in rounds)


@needs_fleet_venv
def test_fleet_round_survives_a_killed_device_and_a_corrupted_update(llama_bundle, non_iid, fleet, tmp_path):
    """Signed globals; dev1 sends NaN, dev2 is SIGKILLed while training round 1 and restarted:
    round 1 goes on with dev0 alone once --round-timeout passes, its adapter is complete and
    finite, the server log names dev1; the restarted dev2 rejoins round 2."""
    from edgeft.device.evaluate import EvalConfig, evaluate
    from edgeft.fleet.procs import free_port
    from edgeft.signing import keygen

    private, public = keygen(tmp_path / "keys" / "fleet.key")
    port, out = free_port(), fleet.root / "server"
    server = fleet.start(
        "server", "server", llama_bundle, "--rounds", 2, "--min-clients", 3, "--out", out,
        "--address", f"127.0.0.1:{port}", "--sign-key", private, "--round-timeout", 60, "--join-timeout", 300,
    )  # fmt: skip
    trusted = ("--trusted-key", public, "--steps-per-round", 4)
    _client(fleet, llama_bundle, non_iid[0], port, 0, *trusted)
    _client(fleet, llama_bundle, non_iid[1], port, 1, *trusted, env={"EDGEFT_TEST_FLEET_CORRUPT": "nan"})
    # dev2 checkpoints every step, each write slowed down (train's test hook), so the kill lands mid-round
    slow = {"EDGEFT_TEST_SLOW_CHECKPOINT": "1"}
    doomed = _client(fleet, llama_bundle, non_iid[2], port, 2, *trusted, "--save-every", 1, env=slow)
    deadline = time.monotonic() + 300
    while not list((fleet.root / "device-2").glob("rounds/run-*/round-001/train/checkpoints/step-*")):
        assert time.monotonic() < deadline and doomed.poll() is None, fleet.log("client2")[-2000:]
        time.sleep(0.1)
    fleet.kill(doomed)  # mid-round: training, a checkpoint written, no reply sent
    assert not (fleet.root / "device-2" / "rounds.jsonl").exists()
    _client(fleet, llama_bundle, non_iid[2], port, 2, *trusted)
    _wait(server, fleet, "server", 600)

    history = json.loads((out / "history.json").read_text())
    first, second = history["rounds"]
    assert [c.split(" ")[0] for c in first["clients"]] == ["dev0"]
    reasons = " | ".join(f"{r['client']}: {r['reason']}" for r in first["rejected"])
    assert "dev1" in reasons and "NaN" in reasons, reasons
    # the killed device: the round's timeout, or Flower's missed heartbeats if they come first
    lost = ("no reply within --round-timeout", "Node Unavailable")
    assert len(first["rejected"]) == 2 and any(word in reasons for word in lost), reasons
    assert sorted(c.split(" ")[0] for c in second["clients"]) == ["dev0", "dev2"]
    assert [r["client"].split(" ")[0] for r in second["rejected"]] == ["dev1"]
    server_log = (out / "server.log").read_text()
    assert "rejected the update of dev1" in server_log and "holds NaN or Inf" in server_log
    for rnd in ("round-001", "round-002"):
        from safetensors.numpy import load_file

        tensors = load_file(str(out / rnd / "adapter" / "adapter_model.safetensors"))
        assert all(np.isfinite(t).all() for t in tensors.values())
        loss = evaluate(EvalConfig(llama_bundle, DATA / "eval.jsonl", adapter=out / rnd / "adapter"))["loss"]
        assert np.isfinite(loss)
    assert not [p.name for p in out.rglob(".*") if p.name != ".flwr" and ".flwr" not in p.parts]  # no staging left


def _tls_files(root: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 / localhost signed by it (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    span = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))

    def cert(subject, issuer, key, signer, ca: bool, sans=None):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(span[0])
            .not_valid_after(span[1])
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    sans = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    files = {
        "ca.pem": cert("edgeft test CA", "edgeft test CA", ca_key, ca_key, True).public_bytes(
            serialization.Encoding.PEM
        ),
        "server.pem": cert("127.0.0.1", "edgeft test CA", server_key, ca_key, False, sans).public_bytes(
            serialization.Encoding.PEM
        ),
        "server.key": server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root / "ca.pem", root / "server.pem", root / "server.key"


@needs_fleet_venv
def test_fleet_round_over_tls(llama_bundle, non_iid, fleet, tmp_path):
    """With certificates the SuperLink serves TLS and the devices verify it with the CA: one round
    of two devices completes and writes its adapter."""
    from edgeft.fleet.procs import free_port

    ca, cert, key = _tls_files(tmp_path / "tls")
    port, out = free_port(), fleet.root / "server"
    server = fleet.start(
        "server", "server", llama_bundle, "--rounds", 1, "--min-clients", 2, "--out", out,
        "--address", f"127.0.0.1:{port}", "--ssl-certfile", cert, "--ssl-keyfile", key, "--ssl-ca-certfile", ca,
        "--round-timeout", 300, "--join-timeout", 300,
    )  # fmt: skip
    tls = ("--root-certificates", ca, "--steps-per-round", 2)
    clients = [_client(fleet, llama_bundle, non_iid[i], port, i, *tls) for i in range(2)]
    _wait(server, fleet, "server", 600)
    for i, c in enumerate(clients):
        _wait(c, fleet, f"client{i}", 120)
    history = json.loads((out / "history.json").read_text())
    assert history["status"] == "finished"
    assert sorted(c.split(" ")[0] for c in history["rounds"][0]["clients"]) == ["dev0", "dev1"]
    assert (out / "round-001" / "adapter" / "adapter_model.safetensors").is_file()
