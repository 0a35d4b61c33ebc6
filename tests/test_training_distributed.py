"""Distributed training on CPU with gloo: 2 ranks launched by torchrun, as a user would launch them.

What must hold: DDP and FSDP2 on 2 ranks follow the single-process loss curve for the same global batch;
the ranks read disjoint data that together cover the epoch; a 2-rank DDP run killed and resumed ends with
the same weights as one that never stopped; fused AdamW takes the clip factor on FSDP2's sharded
parameters; an FSDP2 sharded checkpoint consolidates into a safetensors file whose logits equal the sharded
model's and which `gptforge sample` loads; a resume that would change the global batch stops with a message. Tiny models, fp32, deterministic, so differences are only the
order of floating-point sums.
"""

from __future__ import annotations

import json
import os
import signal
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptforge.config import ModelConfig
from gptforge.errors import UserError
from gptforge.memory import per_gpu_memory
from gptforge.training.checkpoint import latest_valid_checkpoint, list_checkpoints

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 8
SETTINGS = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "model.dropout=0.0",
            "train.micro_batch_size=4", "train.tokens_per_step=256", f"train.max_steps={MAX_STEPS}",
            "train.warmup_steps=2", "train.lr=3e-3", "train.checkpoint_every=3", "train.keep_checkpoints=5",
            "train.log_every=1", "train.eval_every=4", "train.eval_batches=2", "train.sample_every=1000",
            "train.precision=fp32", "train.deterministic=true", "train.device=cpu"]
# Same global batch (256 tokens = 2 x 4 x 32 single-process, 2 ranks x 1 x 4 x 32) and fp32: only the order
# of the sums differs (accumulation vs all-reduce), so per-step losses agree to ~1e-6; 1e-4 leaves margin.
LOSS_ATOL = 1e-4
# Ranks run 2 micro-batches of 2 (2 ranks x 2 x 2 x 32 = 256 tokens): gradient accumulation without
# communication (DDP no_sync / FSDP2 set_requires_gradient_sync(False)) until the last micro-batch. Val:
# 4 batches of 2 split over the ranks score the same 8 sequences as one process's 2 batches of 4.
TWO_RANKS = ["train.micro_batch_size=2", "train.eval_batches=4"]
TIMEOUT = 240


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _torchrun(nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", "0", "--rdzv_backend", "c10d",
            "--rdzv_endpoint", "127.0.0.1:0"]


def _train_cmd(data: Path, out: Path, extra: list[str] = (), nproc: int = 1, resume: bool = False) -> list[str]:
    launcher = _torchrun(nproc) + ["-m", "gptforge"] if nproc > 1 else [sys.executable, "-m", "gptforge"]
    cmd = launcher + ["train", "--data", str(data), "--out", str(out)]
    for s in SETTINGS + list(extra):
        cmd += ["--set", s]
    return cmd + (["--resume", "auto"] if resume else [])


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _assert_same_curve(single_run: Path, run: Path) -> None:
    """Train loss, global grad norm (clipping is active: norms > 1.0) and val loss agree step by step."""
    rows = lambda p: [json.loads(l) for l in (p / "metrics.jsonl").read_text().splitlines()]
    a, b = rows(single_run), rows(run)
    train_a, train_b = ({r["step"]: r for r in rows_ if "loss" in r} for rows_ in (a, b))
    assert sorted(train_a) == sorted(train_b) == list(range(1, MAX_STEPS + 1))
    assert train_a[MAX_STEPS]["loss"] < train_a[1]["loss"] - 0.1  # it actually trains
    assert max(r["grad_norm"] for r in train_a.values()) > 1.0
    for step, ra in train_a.items():
        rb = train_b[step]
        assert abs(ra["loss"] - rb["loss"]) <= LOSS_ATOL, (step, ra["loss"], rb["loss"])
        assert abs(ra["grad_norm"] - rb["grad_norm"]) <= LOSS_ATOL * ra["grad_norm"], (step, ra, rb)
    val_a, val_b = ([r["val_loss"] for r in rows_ if "val_loss" in r] for rows_ in (a, b))
    assert len(val_a) == len(val_b) >= 2
    for va, vb in zip(val_a, val_b):  # the same validation sequences, split over the ranks
        assert abs(va - vb) <= LOSS_ATOL, (val_a, val_b)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from gptforge.data.prepare import prepare
    root = tmp_path_factory.mktemp("dist_data")
    docs = root / "docs"
    docs.mkdir()
    for d in range(40):
        docs.joinpath(f"d{d}.txt").write_text(
            "".join(f"def f{i}(x):\n    return x * {i % 7} + {i % 5}\n\n" for i in range(d * 20, d * 20 + 20)))
    prepare([str(docs)], "char", root / "data", workers=1, val_fraction=0.2)
    return root / "data"


@pytest.fixture(scope="module")
def single_run(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    _run(_train_cmd(data_dir, out))
    return out


@pytest.fixture(scope="module")
def ddp_run(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "run"
    result = _run(_train_cmd(data_dir, out, TWO_RANKS, nproc=2))
    assert "256 tokens per step = 2 x 2 ranks (ddp) x 2 x 32" in result.stdout
    return out


def test_ddp_two_ranks_follow_the_single_process_loss_curve(single_run, ddp_run):
    _assert_same_curve(single_run, ddp_run)
    wa = load_file(str(single_run / "checkpoints" / f"step_{MAX_STEPS}" / "model.safetensors"))
    wb = load_file(str(ddp_run / "checkpoints" / f"step_{MAX_STEPS}" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-4, rtol=1e-4)
    # rank 0 alone wrote the run files: one row per step, no duplicates from rank 1
    steps = [json.loads(l)["step"] for l in (ddp_run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(l)]
    assert steps == list(range(1, MAX_STEPS + 1))


@pytest.fixture(scope="module")
def fsdp_run(data_dir, tmp_path_factory) -> Path:
    # with activation checkpointing: recomputing each block in backward must not change a single number
    out = tmp_path_factory.mktemp("fsdp") / "run"
    result = _run(_train_cmd(data_dir, out, TWO_RANKS + ["train.parallel=fsdp", "train.activation_checkpointing=true"],
                             nproc=2))
    assert "2 ranks (fsdp)" in result.stdout
    return out


def test_fsdp_two_ranks_follow_the_single_process_loss_curve(single_run, fsdp_run):
    out = fsdp_run
    _assert_same_curve(single_run, out)
    # sharded checkpoints, verified by checksums; the last one consolidated for sample/eval/export
    final = latest_valid_checkpoint(out)
    assert final == out / "checkpoints" / f"step_{MAX_STEPS}"
    assert (final / "sharded" / ".metadata").is_file() and (final / "model.safetensors").is_file()
    assert not (out / "checkpoints" / "step_3" / "model.safetensors").exists()
    single_w = load_file(str(single_run / "checkpoints" / f"step_{MAX_STEPS}" / "model.safetensors"))
    fsdp_w = load_file(str(final / "model.safetensors"))
    for k in single_w:
        torch.testing.assert_close(single_w[k], fsdp_w[k], atol=1e-4, rtol=1e-4)


MUON = ["train.optimizer=muon", "train.muon_lr=0.02"]


def test_muon_under_ddp_and_fsdp2_follows_the_single_process_curve(data_dir, tmp_path):
    """Muon (with AdamW for the rest) on 2 ranks: DDP steps full copies; under FSDP2 torch's Muon receives
    sharded DTensor parameters and orthogonalizes the whole matrix (DTensor gathers what each matmul of the
    Newton-Schulz iteration needs), so both follow one process's curve and end at its weights."""
    single, ddp, fsdp = tmp_path / "single", tmp_path / "ddp", tmp_path / "fsdp"
    _run(_train_cmd(data_dir, single, MUON))
    _run(_train_cmd(data_dir, ddp, TWO_RANKS + MUON, nproc=2))
    _run(_train_cmd(data_dir, fsdp, TWO_RANKS + MUON + ["train.parallel=fsdp"], nproc=2))
    final = f"checkpoints/step_{MAX_STEPS}/model.safetensors"
    single_w = load_file(str(single / final))
    for run in (ddp, fsdp):
        _assert_same_curve(single, run)
        weights = load_file(str(run / final))
        for k in single_w:
            torch.testing.assert_close(single_w[k], weights[k], atol=1e-4, rtol=1e-4)
    # Muon's momentum through DCP: a sharded checkpoint resumes bit for bit, a single-process one continues
    # under FSDP2 on the same curve
    fsdp_settings = TWO_RANKS + MUON + ["train.parallel=fsdp"]
    same = _truncated_copy(fsdp, tmp_path / "same", 6)
    assert "from step_6" in _run(_train_cmd(data_dir, same, fsdp_settings, nproc=2, resume=True)).stdout
    assert load_file(str(same / final)).keys() == load_file(str(fsdp / final)).keys()
    for k, v in load_file(str(fsdp / final)).items():
        assert torch.equal(v, load_file(str(same / final))[k]), f"{k} differs after a Muon FSDP2 resume"
    upgraded = _truncated_copy(single, tmp_path / "upgraded", 6)
    assert "from step_6" in _run(_train_cmd(data_dir, upgraded, fsdp_settings, nproc=2, resume=True)).stdout
    for step in (7, 8):
        assert abs(_losses(upgraded)[step] - _losses(single)[step]) <= LOSS_ATOL


def _truncated_copy(run: Path, dest: Path, last_step: int) -> Path:
    """A copy of `run` as if it had been killed right after checkpoint `last_step`."""
    shutil.copytree(run, dest)
    for step, path in list_checkpoints(dest):
        if step > last_step:
            shutil.rmtree(path)
    return dest


def test_fsdp_resume_is_exact_and_converts_to_and_from_one_process(data_dir, fsdp_run, single_run, tmp_path):
    final = f"checkpoints/step_{MAX_STEPS}/model.safetensors"
    same = _truncated_copy(fsdp_run, tmp_path / "same", 6)
    result = _run(_train_cmd(data_dir, same, TWO_RANKS + ["train.parallel=fsdp", "train.activation_checkpointing=true"],
                             nproc=2, resume=True))
    assert "from step_6" in result.stdout
    wa, wb = load_file(str(fsdp_run / final)), load_file(str(same / final))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs after a 2-rank FSDP resume"
    assert _losses(same) == _losses(fsdp_run)
    # one process reads the 2-rank shards (DCP reshards into full tensors) and continues the same curve
    one = _truncated_copy(fsdp_run, tmp_path / "one", 6)
    result = _run(_train_cmd(data_dir, one, ["train.parallel=auto"], resume=True))
    assert "re-partitioned" in result.stdout
    for step in (7, 8):
        assert abs(_losses(one)[step] - _losses(single_run)[step]) <= LOSS_ATOL
    # and the other way: a single-process checkpoint continues under FSDP2 on 2 ranks
    upgraded = _truncated_copy(single_run, tmp_path / "upgraded", 6)
    result = _run(_train_cmd(data_dir, upgraded, ["train.parallel=fsdp"], nproc=2, resume=True))
    assert "from step_6" in result.stdout and "re-partitioned" in result.stdout
    for step in (7, 8):
        assert abs(_losses(upgraded)[step] - _losses(single_run)[step]) <= LOSS_ATOL


def _kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both of its workers: this test started them all
    proc.wait()


def test_ddp_kill_and_resume_matches_the_uninterrupted_run(data_dir, ddp_run, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(data_dir, out, TWO_RANKS, nproc=2), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + TIMEOUT
    try:
        while not (out / "checkpoints" / "step_3" / "checksums.json").exists():
            assert proc.poll() is None, "training exited before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.05)
    finally:
        _kill_group(proc)
    assert max(s for s, _ in list_checkpoints(out)) < MAX_STEPS, "the run finished before it could be killed"
    resumed = _run(_train_cmd(data_dir, out, TWO_RANKS, nproc=2, resume=True))
    assert "resuming" in resumed.stdout
    wa = load_file(str(ddp_run / "checkpoints" / f"step_{MAX_STEPS}" / "model.safetensors"))
    wb = load_file(str(out / "checkpoints" / f"step_{MAX_STEPS}" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs after a 2-rank kill and resume"
    assert _losses(ddp_run) == _losses(out)


def test_resume_on_another_world_size(data_dir, ddp_run, tmp_path):
    """Same global batch: re-partitioned exactly (one process continues the 2-rank curve). Different global
    batch: refused with a message naming train.tokens_per_step."""
    out = _truncated_copy(ddp_run, tmp_path / "run", 6)
    result = _run(_train_cmd(data_dir, out, resume=True))
    assert "re-partitioned" in result.stdout
    ddp, single = _losses(ddp_run), _losses(out)
    for step in (7, 8):
        assert abs(ddp[step] - single[step]) <= LOSS_ATOL, (step, ddp[step], single[step])
    refused = subprocess.run(_train_cmd(data_dir, out, ["train.tokens_per_step=128", "train.max_steps=12"],
                                        resume=True), env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert refused.returncode == 2
    assert "train.tokens_per_step=256" in refused.stderr and "Traceback" not in refused.stderr


WORKER = textwrap.dedent('''
    """2 ranks: the trainer's loader partition over one epoch, then 2 FSDP2 steps, a sharded checkpoint and
    the sharded model's logits on a fixed input."""
    import json, sys
    import torch
    from safetensors.torch import save_file
    from gptforge.training import distributed as D
    from gptforge.resolve import resolve_run_config
    from gptforge.training.batches import open_batch_source
    from gptforge.training.trainer import Trainer

    data, out, report = sys.argv[1], sys.argv[2], sys.argv[3]
    config = resolve_run_config(data=data, out=out, overrides=sys.argv[4:])
    trainer = Trainer(config)
    loader = open_batch_source(data, "train", trainer.seq_len, config.train.micro_batch_size,  # as the trainer's
                               seed=config.data.seed, rank=trainer.rank, world_size=trainer.world_size)
    seen = [loader._next_index() for _ in range(loader.sequences_per_rank)]  # this rank's whole epoch
    assert loader.epoch == 0
    everyone = D.all_gather_object(seen)
    result = trainer.fit()
    trainer.model.eval()
    idx = torch.arange(24).remainder(config.model.vocab_size).view(2, 12)
    with torch.no_grad():
        logits = trainer.model(idx)[0]
    if trainer.is_main:
        save_file({"logits": logits.contiguous(), "idx": idx}, report + ".safetensors")
        with open(report, "w") as f:
            json.dump({"seen": everyone, "sequences": loader.sequences_per_epoch, "checkpoint": str(result.checkpoint),
                       "ranks": loader.world_size}, f)
    D.exit_worker(0)
''')


@pytest.fixture(scope="module")
def fsdp_worker(data_dir, tmp_path_factory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("fsdp_worker")
    script = root / "worker.py"
    script.write_text(WORKER)
    report = root / "report.json"
    overrides = [s for s in SETTINGS if not s.startswith("train.max_steps")] + ["train.max_steps=2",
                                                                                 "train.parallel=fsdp"]
    result = subprocess.run(_torchrun() + [str(script), str(data_dir), str(root / "run"), str(report)] + overrides,
                            env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-5000:]
    return json.loads(report.read_text()), root


def test_ranks_read_disjoint_data_covering_the_epoch(fsdp_worker):
    report, _ = fsdp_worker
    rank0, rank1 = (set(s) for s in report["seen"])
    assert len(rank0) == len(report["seen"][0]) and len(rank1) == len(report["seen"][1])  # no repeats
    assert not rank0 & rank1
    n = report["sequences"]
    assert n > 50 and report["ranks"] == 2
    assert rank0 | rank1 <= set(range(n))
    assert len(rank0 | rank1) == n - n % 2  # the whole epoch but the odd sequence out


def test_fsdp_checkpoint_consolidates_to_identical_logits_and_samples(fsdp_worker, tmp_path):
    from gptforge.training.dist_checkpoint import consolidate, is_sharded_checkpoint
    from gptforge.weights import load_weights

    report, root = fsdp_worker
    checkpoint = Path(report["checkpoint"])
    assert is_sharded_checkpoint(checkpoint)
    expected = load_file(str(root / "report.json.safetensors"))
    separate = consolidate(checkpoint, tmp_path / "consolidated.safetensors")  # explicit, in this process
    for weights in (separate, checkpoint / "model.safetensors"):  # and the trainer's own consolidation
        model = load_weights(weights).eval()
        with torch.no_grad():
            logits = model(expected["idx"])[0]
        torch.testing.assert_close(logits, expected["logits"], atol=1e-6, rtol=1e-6)
    sample = subprocess.run([sys.executable, "-m", "gptforge", "sample", "--model", str(checkpoint), "--seed", "1",
                             "--max-new-tokens", "8", "def"], env=_env(), capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.strip()
    cli = subprocess.run([sys.executable, "-m", "gptforge", "consolidate", str(root / "run")], env=_env(),
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert cli.returncode == 0 and "model.safetensors" in cli.stdout, cli.stderr
    from gptforge.loading import load_model
    unconsolidated = tmp_path / "unconsolidated"
    shutil.copytree(checkpoint, unconsolidated)
    (unconsolidated / "model.safetensors").unlink()
    with pytest.raises(UserError, match="gptforge consolidate"):
        load_model(str(unconsolidated))


def test_consolidate_on_torch_without_dcp_load_no_dist(fsdp_worker, tmp_path, monkeypatch):
    """torch 2.5/2.6's `dcp.load` has no `no_dist`: consolidation must still load in this process alone
    (the deprecated `load_state_dict` path) and give the same weights as the trainer's consolidation."""
    import torch.distributed.checkpoint as dcp
    from gptforge.training.dist_checkpoint import consolidate

    def load_before_2_7(state_dict, *, checkpoint_id=None, storage_reader=None, planner=None, process_group=None):
        raise AssertionError("called dcp.load without no_dist: it would wait for other ranks in a torchrun job")

    monkeypatch.setattr(dcp, "load", load_before_2_7)
    checkpoint = Path(fsdp_worker[0]["checkpoint"])
    old = load_file(str(consolidate(checkpoint, tmp_path / "old_torch.safetensors")))
    reference = load_file(str(checkpoint / "model.safetensors"))
    assert old.keys() == reference.keys()
    for key in reference:
        assert torch.equal(old[key], reference[key]), key


def test_consolidate_refuses_a_non_sharded_directory(tmp_path):
    from gptforge.training.dist_checkpoint import consolidate
    with pytest.raises(UserError, match="not a sharded checkpoint"):
        consolidate(tmp_path)
    result = subprocess.run([sys.executable, "-m", "gptforge", "consolidate", str(tmp_path / "missing")],
                            env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 2 and "Traceback" not in result.stderr


# ---- single-process pieces ---------------------------------------------------------------------------------


SCALED_STEP_WORKER = textwrap.dedent('''
    """2 ranks: fused AdamW on FSDP2's DTensor parameters steps on gradients scaled by
    step_with_scaled_gradients exactly as on gradients multiplied by hand, and not as on unscaled ones."""
    import copy, json, sys
    import torch
    import torch.distributed as dist
    from gptforge.training import distributed as D
    from gptforge.training.step import step_with_scaled_gradients

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    x = torch.randn(4, 8)
    weights = {}
    for mode in ("scaled", "multiplied", "unscaled"):
        model = copy.deepcopy(base)
        D.fsdp_api().fully_shard(model)
        # eps 1.0: Adam's update depends on the gradient's scale (with eps ~0 it nearly would not)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1, eps=1.0, fused=True)
        model(x).sum().backward()
        params = list(model.parameters())
        if mode == "scaled":
            step_with_scaled_gradients(opt, params, 0.25)
        else:
            for p in params:
                p.grad.mul_(0.25 if mode == "multiplied" else 1.0)
            opt.step()
        weights[mode] = [p.full_tensor() for p in params]
    if dist.get_rank() == 0:
        def same(a, b):
            return all(torch.allclose(u, v, rtol=1e-6, atol=1e-7) for u, v in zip(weights[a], weights[b]))
        with open(sys.argv[1], "w") as f:
            json.dump({"as_multiplied": same("scaled", "multiplied"), "as_unscaled": same("scaled", "unscaled"),
                       "dtensor": hasattr(params[0], "full_tensor")}, f)
    D.exit_worker(0)
''')


def test_scaled_step_on_fsdp2_parameters_equals_multiplied_gradients(tmp_path):
    """Clipping hands the factor to fused AdamW as grad_scale on FSDP2's sharded parameters too."""
    script, report = tmp_path / "worker.py", tmp_path / "report.json"
    script.write_text(SCALED_STEP_WORKER)
    _run(_torchrun() + [str(script), str(report)])
    assert json.loads(report.read_text()) == {"as_multiplied": True, "as_unscaled": False, "dtensor": True}


def test_single_process_context_has_no_process_group(monkeypatch):
    from gptforge.training import distributed as D
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    ctx = D.init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
    assert not torch.distributed.is_initialized()
    assert D.resolve_parallel("auto", 1) == "none" and D.resolve_parallel("auto", 4) == "ddp"
    with pytest.raises(UserError, match="unrelated"):
        D.resolve_parallel("none", 2)
    with pytest.raises(UserError, match="torchrun"):
        D.wrap_model(torch.nn.Linear(2, 2), ctx, "fsdp")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(UserError, match="inconsistent"):
        D.init_distributed("cpu")


def test_exit_worker_flushes_what_was_printed_and_keeps_the_exit_code(tmp_path):
    """The worker's last words (a block-buffered pipe, no newline) still arrive, and torchrun sees the code."""
    code = "from gptforge.training import distributed as D\nprint('saved', end='')\nD.exit_worker(3)\n"
    result = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert (result.returncode, result.stdout, result.stderr) == (3, "saved", "")


@pytest.mark.parametrize("env, skips_finalization", [({"WORLD_SIZE": "2", "RANK": "1"}, True),
                                                     ({"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "1"}, True),
                                                     ({}, False)])
def test_torchrun_workers_leave_the_cli_through_exit_worker(monkeypatch, env, skips_finalization):
    import gptforge.cli as cli
    from gptforge.training import distributed as D
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(cli, "main", lambda: 7)
    exits = []
    monkeypatch.setattr(D, "exit_worker", lambda code: exits.append(("exit_worker", code)) or sys.exit(code))
    with pytest.raises(SystemExit) as stopped:
        cli.entry_point()
    assert stopped.value.code == 7
    assert exits == ([("exit_worker", 7)] if skips_finalization else [])


def test_fsdp_api_falls_back_to_the_private_module_of_torch_2_5(monkeypatch):
    """torch 2.5 has FSDP2 only under torch.distributed._composable.fsdp (public from 2.6)."""
    import torch.distributed._composable.fsdp as composable
    import torch.distributed.fsdp as public
    from gptforge.training import distributed as D
    names = ("fully_shard", "FSDPModule", "MixedPrecisionPolicy", "register_fsdp_forward_method")
    assert D.fsdp_api() is public and all(hasattr(public, name) for name in names)
    monkeypatch.delattr(public, "fully_shard")  # what torch 2.5's torch.distributed.fsdp looks like to us
    assert D.fsdp_api() is composable and all(hasattr(composable, name) for name in names)
    policy = D.mixed_precision_policy("bf16")
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert not D.is_fsdp(torch.nn.Linear(2, 2))


def test_activation_checkpointing_keeps_names_and_gradients(tiny_config):
    from gptforge.model import GPT
    from gptforge.training import distributed as D
    torch.manual_seed(0)
    plain, checkpointed = GPT(tiny_config), GPT(tiny_config)
    checkpointed.load_state_dict(plain.state_dict())
    D.apply_activation_checkpointing(checkpointed)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in checkpointed.named_parameters()]
    idx = torch.randint(0, tiny_config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    for model in (plain, checkpointed):
        model(idx, idx)[1].backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_per_gpu_memory_formula():
    config = ModelConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    P = 124_439_808 + (50304 - 50257) * 768  # GPT-2 124M (tied head once) + the vocabulary padding rows
    ddp = per_gpu_memory(config, 8, micro_batch=4, parallel="ddp")
    assert ddp["params"] == P
    assert ddp["parts"]["weights (fp32)"] == 4 * P and ddp["parts"]["AdamW state (fp32 m, v)"] == 8 * P
    assert per_gpu_memory(config, 1, 4, parallel="ddp")["total"] == ddp["total"]  # replicas: no saving
    one, eight = (per_gpu_memory(config, n, 4, parallel="fsdp") for n in (1, 8))
    states = lambda r: sum(v for k, v in r["parts"].items() if " shard)" in k)
    assert states(one) == 16 * P and states(eight) == 2 * P  # 16 bytes/param divided by the ranks
    assert eight["total"] < one["total"] < ddp["total"]
    act = lambda r: next(v for k, v in r["parts"].items() if k.startswith("activations"))
    checkpointed = per_gpu_memory(config, 8, 4, parallel="fsdp", activation_checkpointing=True)
    assert act(checkpointed) < act(eight)
    with pytest.raises(UserError):
        per_gpu_memory(config, 0, 4)
