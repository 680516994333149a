"""Distributed training on CPU (gloo): FSDP2 against DDP for every architecture, experts
unused on one rank, bf16 mixed precision, sharded checkpoints with per-rank RNG, resume
after a kill, resume on another number of processes, and 2 "nodes" over loopback.

Process start-up dominates on a small machine, so one torchrun job (tests/distributed_worker.py)
runs most of the small trainings; the kill test adds two more launches.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distributed_worker import truncate_run
from modformer.config import ConfigError
from modformer.models.gpt import GPTForCausalLM
from modformer.train import checkpoint as ckpt_lib
from modformer.train import dist_checkpoint as dcp_lib
from modformer.train.config import TrainConfig, load_train_config
from modformer.train.resume import resolve_resume_batch
from modformer.train.trainer import train

WORKER = Path(__file__).with_name("distributed_worker.py")
TINY = {
    "gpt": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64},
    "mom": {"n_embd": 32, "n_head": 2, "n_positions": 64, "router_dim": 16},
    # 16 FFN experts, top-2, 4 tokens per rank: at most 8 experts get a token on a rank.
    "moduleformer": {
        "n_layer": 2,
        "n_embd": 32,
        "n_head": 2,
        "att_hidden": 16,
        "n_ffd_experts": 16,
        "ffd_hidden": 32,
        "router_hidden": 16,
        "n_positions": 64,
    },
}


def run_args(data_dir: Path, out_dir: Path, arch: str = "gpt", **extra) -> list[str]:
    settings = {
        "model.arch": arch,
        "model.overrides": json.dumps(TINY[arch] | extra.pop("model", {})),
        "data.dir": data_dir,
        "data.block_size": 16,
        "out_dir": out_dir,
        "max_steps": 4,
        "batch_size": 2,
        "eval_batches": 2,
        "eval_interval": 0,
        "log_interval": 1,
        "ckpt_interval": 0,
        "progress": "false",
        "threads": 1,
        "optim.warmup_steps": 2,
        "optim.lr": 3e-3,
    }
    settings.update(extra)
    return [f"{k}={v}" for k, v in settings.items()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(nproc: int, port: int, *rest: str, nodes: tuple[int, int] | None = None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    if nodes is None:
        cmd += ["--master_addr", "127.0.0.1", "--master_port", str(port)]
    else:  # one "node" of a multi-node job; the rendezvous runs at node 0's endpoint
        cmd += ["--nnodes", str(nodes[1]), "--node_rank", str(nodes[0])]
        cmd += ["--rdzv_endpoint", f"127.0.0.1:{port}"]
    return cmd + list(rest)


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


def cli_train_cmd(args: list[str], resume: bool = False) -> list[str]:
    cmd = ["-m", "modformer.cli", "train"] + (["--resume"] if resume else [])
    return cmd + [a for kv in args for a in ("--set", kv)]


def final_params(out_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    import modformer.models  # noqa: F401  (registers the architectures)

    model = AutoModelForCausalLM.from_pretrained(out_dir / "model")
    return dict(model.named_parameters())


def assert_same_model(a: Path, b: Path, atol: float) -> None:
    pa, pb = final_params(a), final_params(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        torch.testing.assert_close(pa[name], pb[name], atol=atol, rtol=0, msg=name)


def losses(out_dir: Path) -> list[float]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


@pytest.fixture(scope="module")
def worker(tiny_data_dir, tmp_path_factory):
    """One 2-process torchrun job with every small training; returns its results and dir."""
    root = tmp_path_factory.mktemp("dist")
    data = tiny_data_dir
    jobs: list[dict] = []
    # ModuleFormer with 1 sequence of 4 tokens per rank: most experts unused per rank.
    shapes = {arch: {} for arch in TINY} | {"moduleformer": {"batch_size": 1, "data.block_size": 4}}
    for arch in TINY:
        for parallel in ("ddp", "fsdp"):
            out = root / f"{arch}_{parallel}"
            args = run_args(data, out, arch, parallel=parallel, ckpt_interval=2, **shapes[arch])
            jobs.append({"op": "train", "name": f"{arch}_{parallel}", "args": args})
    # bf16 under FSDP (MixedPrecisionPolicy + autocast), with and without grouped GEMMs.
    for arch in ("gpt", "moduleformer"):
        out = root / f"{arch}_fsdp_bf16"
        args = run_args(data, out, arch, parallel="fsdp", precision="bf16", **shapes[arch])
        jobs.append({"op": "train", "name": out.name, "args": args})
    # Resume 1 -> 2 processes: the 1-process run below is made by the test beforehand.
    one_proc = root / "one_proc"
    resumed_1to2 = root / "resumed_1to2"
    jobs.append({"op": "truncate", "src": str(one_proc), "dst": str(resumed_1to2), "step": 3})
    jobs.append(
        {
            "op": "train",
            "name": "resumed_1to2",
            "args": run_args(
                data, resumed_1to2, parallel="fsdp", max_steps=6, ckpt_interval=3, grad_accum=2
            ),
            "resume": True,
        }
    )
    # 2-process references: for 2 -> 1 (no dropout) and for the kill test (dropout).
    jobs.append(
        {
            "op": "train",
            "name": "fsdp_ref",
            "args": run_args(
                data, root / "fsdp_ref", parallel="fsdp", max_steps=6, ckpt_interval=3
            ),
        }
    )
    # Same-size resume with dropout, for FSDP and DDP: exact only with every rank's RNG.
    for parallel in ("fsdp", "ddp"):
        ref, resumed = root / f"dropout_{parallel}", root / f"dropout_{parallel}_resumed"
        args = dict(parallel=parallel, max_steps=6, ckpt_interval=3, model={"dropout": 0.2})
        jobs.append({"op": "train", "name": ref.name, "args": run_args(data, ref, **args)})
        jobs.append({"op": "truncate", "src": str(ref), "dst": str(resumed), "step": 3})
        jobs.append(
            {
                "op": "train",
                "name": resumed.name,
                "args": run_args(data, resumed, **args),
                "resume": True,
            }
        )
    jobs += [{"op": "unused_params"}, {"op": "mixed_precision"}]
    jobs += [{"op": "grad_parity", "arch": arch, "overrides": TINY[arch]} for arch in TINY]

    # The 1-process FSDP-format run (unsharded, DCP checkpoints): 2 x 2 sequences per step.
    cfg = load_train_config(
        None, run_args(data, one_proc, parallel="fsdp", max_steps=6, ckpt_interval=3, grad_accum=2)
    )
    train(cfg)

    spec = root / "spec.json"
    spec.write_text(json.dumps({"results": str(root / "results.json"), "jobs": jobs}))
    done = subprocess.run(
        torchrun_cmd(2, free_port(), str(WORKER), str(spec)),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return json.loads((root / "results.json").read_text()), root


@pytest.mark.parametrize("arch", list(TINY))
def test_fsdp_ends_with_the_loss_of_ddp(worker, arch):
    results, root = worker
    ddp, fsdp = results[f"{arch}_ddp"], results[f"{arch}_fsdp"]
    assert fsdp["val_loss"] == pytest.approx(ddp["val_loss"], abs=1e-3)
    assert losses(root / f"{arch}_fsdp") == pytest.approx(losses(root / f"{arch}_ddp"), abs=1e-3)
    assert ddp["ranks_in_sync"] is True
    # Gathered from the shards into a normal HF directory, equal to DDP's replica.
    assert_same_model(root / f"{arch}_ddp", root / f"{arch}_fsdp", atol=1e-4)
    assert fsdp["params"] == ddp["params"]


@pytest.mark.parametrize("arch", list(TINY))
def test_fsdp_gradients_are_the_mean_of_every_ranks_full_gradients(worker, arch):
    """One backward, each rank on its own batch (routing and aux losses included): FSDP's
    reduce-scattered gradient of every parameter against the unsharded model's gradients
    averaged over ranks."""
    assert worker[0][f"grad_parity_{arch}"] < 1e-5


def test_moduleformer_rank_with_unused_experts_does_not_hang(worker):
    """Each rank routes 4 tokens x top-2 to 16 FFN experts, so experts are unused on a rank
    (rank 0's per-expert load is in the metrics) and FSDP still finished, equal to DDP."""
    results, root = worker
    records = [json.loads(x) for x in (root / "moduleformer_fsdp" / "metrics.jsonl").open()]
    load = [r["load/ffn/0"] for r in records if "load/ffn/0" in r]
    assert load and all(min(step_load) == 0.0 for step_load in load)
    assert results["moduleformer_fsdp"]["step"] == 4


def test_parameter_unused_on_one_rank_gets_a_zero_gradient(worker):
    results, _ = worker
    assert results["unused_params_rank1"]["unused_on_rank"]  # the hazard really happened
    assert not results["unused_params_rank0"]["unused_on_rank"]
    for rank in (0, 1):
        assert results[f"unused_params_rank{rank}"]["max_grad_error"] < 1e-6


def test_bf16_under_fsdp_computes_in_bf16_with_fp32_master_weights(worker):
    mp = worker[0]["mixed_precision"]
    assert mp["compute_dtype"] == "torch.bfloat16"
    assert mp["master_dtypes"] == ["torch.float32"] and mp["grad_dtypes"] == ["torch.float32"]
    assert mp["sharded"] is True


@pytest.mark.parametrize("arch", ["gpt", "moduleformer"])
def test_bf16_fsdp_training_tracks_fp32(worker, arch):
    _, root = worker
    bf16 = losses(root / f"{arch}_fsdp_bf16")
    assert len(bf16) == 4 and all(math.isfinite(x) for x in bf16)
    assert bf16 == pytest.approx(losses(root / f"{arch}_fsdp"), abs=0.05)


def test_fsdp_checkpoint_is_sharded_with_every_ranks_rng(worker):
    _, root = worker
    ckpt = ckpt_lib.latest_checkpoint(root / "gpt_fsdp" / "checkpoints")
    assert dcp_lib.is_sharded_checkpoint(ckpt)
    assert sorted(p.name for p in (ckpt / "dcp").iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    rng = [json.loads((ckpt / "rng" / f"rank_{r:05d}.json").read_text()) for r in (0, 1)]
    assert rng[0]["torch"] != rng[1]["torch"]  # each rank has its own stream
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["world_size"] == 2
    assert not list((root / "gpt_fsdp" / "checkpoints").glob(".*tmp*"))


def test_ddp_checkpoint_holds_every_ranks_rng(worker):
    _, root = worker
    ckpt = ckpt_lib.latest_checkpoint(root / "gpt_ddp" / "checkpoints")
    state = ckpt_lib.load_trainer_state(ckpt)
    assert len(state["rng"]) == 2 and state["world_size"] == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_resume_with_dropout_is_exact_per_rank(worker, parallel):
    results, root = worker
    ref, resumed = results[f"dropout_{parallel}"], results[f"dropout_{parallel}_resumed"]
    assert resumed["val_loss"] == pytest.approx(ref["val_loss"], abs=1e-6)
    assert losses(root / f"dropout_{parallel}_resumed") == pytest.approx(
        losses(root / f"dropout_{parallel}"), abs=1e-6
    )
    assert_same_model(root / f"dropout_{parallel}", root / f"dropout_{parallel}_resumed", 1e-6)


def test_resume_from_one_process_on_two(worker):
    """1 process x 2 micro-batches of 2 -> 2 processes x 1 micro-batch of 2 (grad_accum is
    rescaled to keep the global batch of 4): the same windows, so the same run up to the
    order of floating-point sums."""
    results, root = worker
    reference = json.loads((root / "one_proc" / "final.json").read_text())
    assert results["resumed_1to2"]["val_loss"] == pytest.approx(reference["val_loss"], abs=1e-4)
    assert losses(root / "resumed_1to2") == pytest.approx(losses(root / "one_proc"), abs=1e-4)
    assert_same_model(root / "one_proc", root / "resumed_1to2", atol=1e-4)


def test_resume_from_two_processes_on_one(worker, tiny_data_dir):
    _, root = worker
    resumed = root / "resumed_2to1"
    truncate_run(root / "fsdp_ref", resumed, step=3)
    args = run_args(tiny_data_dir, resumed, parallel="fsdp", max_steps=6, ckpt_interval=3)
    final = train(load_train_config(None, args), resume=True)
    reference = json.loads((root / "fsdp_ref" / "final.json").read_text())
    assert final["val_loss"] == pytest.approx(reference["val_loss"], abs=1e-4)
    assert losses(resumed) == pytest.approx(losses(root / "fsdp_ref"), abs=1e-4)
    assert_same_model(root / "fsdp_ref", resumed, atol=1e-4)
    state = json.loads(
        (ckpt_lib.latest_checkpoint(resumed / "checkpoints") / "trainer_state.json").read_text()
    )
    assert state["world_size"] == 1 and state["config"]["grad_accum"] == 2


def test_resume_needs_the_same_global_batch(worker, tiny_data_dir, tmp_path):
    _, root = worker
    resumed = tmp_path / "odd"
    truncate_run(root / "fsdp_ref", resumed, step=3)
    args = run_args(tiny_data_dir, resumed, parallel="fsdp", max_steps=6, batch_size=3)
    with pytest.raises(ConfigError, match="global batch was 4 sequences"):
        train(load_train_config(None, args), resume=True)
    with pytest.raises(ConfigError, match="parallel=fsdp"):
        train(load_train_config(None, run_args(tiny_data_dir, resumed, max_steps=6)), resume=True)


def test_resume_batch_rescaling_rules():
    cfg = TrainConfig(batch_size=4, grad_accum=1)
    resolve_resume_batch(cfg, 4, 1, saved_world=4, world=2)  # 16 sequences on 2 processes
    assert (cfg.batch_size, cfg.grad_accum) == (4, 2)
    cfg = TrainConfig(batch_size=4, grad_accum=3)
    resolve_resume_batch(cfg, 4, 3, saved_world=1, world=2)  # 12 = 2 x 6: batch_size 2
    assert (cfg.batch_size, cfg.grad_accum) == (2, 3)
    cfg = TrainConfig(batch_size=3, grad_accum=1)
    with pytest.raises(ConfigError, match="allow_batch_change"):
        resolve_resume_batch(cfg, 3, 1, saved_world=1, world=2)
    cfg.allow_batch_change = True
    resolve_resume_batch(cfg, 3, 1, saved_world=1, world=2)
    assert (cfg.batch_size, cfg.grad_accum) == (3, 1)


def test_fsdp_rejects_fp16():
    with pytest.raises(ConfigError, match="use precision=bf16"):
        load_train_config(None, ["parallel=fsdp", "precision=fp16"])
    with pytest.raises(ConfigError, match="parallel must be ddp or fsdp"):
        load_train_config(None, ["parallel=zero3"])


def test_fsdp_run_killed_and_resumed_on_two_nodes_ends_like_uninterrupted(worker, tiny_data_dir):
    """A 2-process FSDP run (dropout on) is SIGKILLed after a checkpoint, then resumed as a
    2-node job over loopback (two torchrun launchers, 1 process each, one rendezvous)."""
    results, root = worker
    victim = root / "victim"
    args = run_args(
        tiny_data_dir, victim, parallel="fsdp", max_steps=6, ckpt_interval=3, model={"dropout": 0.2}
    )
    # max_steps=6 with checkpoints every 3 steps: the reference is the worker's dropout_fsdp.
    launcher = subprocess.Popen(
        torchrun_cmd(2, free_port(), *cli_train_cmd(args)),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not (victim / "checkpoints" / "step_000003").exists():
        assert launcher.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    assert not (victim / "final.json").exists(), "the run finished before it was killed"

    port = free_port()
    nodes = [
        subprocess.Popen(
            torchrun_cmd(1, port, *cli_train_cmd(args, resume=True), nodes=(rank, 2)),
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs[0][-3000:] + outputs[1][-3000:]
    final = json.loads((victim / "final.json").read_text())
    assert final["val_loss"] == pytest.approx(results["dropout_fsdp"]["val_loss"], abs=1e-6)
    assert_same_model(root / "dropout_fsdp", victim, atol=1e-6)
    steps = [json.loads(x)["step"] for x in (victim / "metrics.jsonl").open() if '"loss"' in x]
    assert steps == sorted(set(steps))
    # The final directory is a normal model every other command loads.
    model = GPTForCausalLM.from_pretrained(victim / "model")
    assert model.config.dropout == 0.2
