"""The trainer's parts in one process, without torchrun: the checkpointer's round trip of every
part it owns, the evaluator, the step and its read-back, and the stop-flag agreement between
two real gloo processes (one step late, the same step on every rank)."""

from __future__ import annotations

import json
import math
import multiprocessing
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pretrain.api.validation import load_job  # noqa: E402
from pretrain.data.collator import Collator  # noqa: E402
from pretrain.data.loader import DistributedLoader  # noqa: E402
from pretrain.storage.manifest import step_name  # noqa: E402
from pretrain.trainer import step as step_module  # noqa: E402
from pretrain.trainer.checkpointer import JOB_FILE, LOADER_FILE, Checkpointer, open_store, rng_file  # noqa: E402
from pretrain.trainer.evaluator import EVAL_MASK_STREAM, Evaluator  # noqa: E402
from pretrain.trainer.step import StepCall, StepResult, StepSync, train_step  # noqa: E402
from pretrain.trainer.world import World  # noqa: E402
from tests.splits import IndexSplit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class FileEngine:
    """What the checkpointer asks of a DeepSpeed engine: a folder per tag, loaded back."""

    def __init__(self, value: float) -> None:
        self.value = value

    def save_checkpoint(self, root: str, tag: str, save_latest: bool) -> None:
        Path(root, tag).mkdir(parents=True, exist_ok=True)
        Path(root, tag, "model.json").write_text(json.dumps({"value": self.value}))

    def load_checkpoint(self, root: str, tag: str, load_module_strict: bool) -> tuple[str | None, dict[str, Any]]:
        path = Path(root, tag, "model.json")
        if not path.exists():
            return None, {}
        self.value = json.loads(path.read_text())["value"]
        return str(path.parent), {}


def job(tmp_path: Path, *sets: str) -> Any:
    return load_job(ROOT / "examples" / "tiny-cpu.yaml", [f"checkpoint.uri={tmp_path / 'ckpt'}", *sets])


def test_the_checkpointer_saves_and_loads_every_part(tmp_path: Path) -> None:
    j, world = job(tmp_path), World()
    store = open_store(j, tmp_path / "work", world)
    ckpt = Checkpointer(j, tmp_path / "work", world, store)
    assert ckpt.start_choice() is None, "an empty store: a fresh start"
    loader = DistributedLoader(IndexSplit(50), rank=0, world_size=1, micro_batch=2, accumulation=1, seed=3)
    for _ in range(4):
        loader.next_step()
    torch.manual_seed(11)
    np.random.seed(11)
    random.seed(11)
    ckpt.save(FileEngine(2.5), loader, 4, background=False)
    expected = (torch.rand(3), np.random.rand(), random.random(), loader.next_step())
    store.close()
    store.release_lease()
    folder = tmp_path / "ckpt" / step_name(4)
    assert {LOADER_FILE, JOB_FILE, rng_file(0), "model.json", "manifest.json"} <= {p.name for p in folder.iterdir()}
    assert json.loads((folder / JOB_FILE).read_text())["metadata"]["name"] == j.metadata.name

    store = open_store(j, tmp_path / "work2", world)
    again = Checkpointer(j, tmp_path / "work2", world, store)
    step = again.start_choice()
    assert step == 4 and again.resume_mode(step) == "direct"
    engine = FileEngine(0.0)
    fresh = DistributedLoader(IndexSplit(50), rank=0, world_size=1, micro_batch=2, accumulation=1, seed=3)
    torch.manual_seed(0)
    assert again.load(engine, fresh, step, "direct", []) == 4
    assert engine.value == 2.5
    got = (torch.rand(3), np.random.rand(), random.random(), fresh.next_step())
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1] and got[2] == expected[2]
    assert all((a == b).all() for a, b in zip(got[3], expected[3], strict=True)), "the loader continues"
    store.close()
    store.release_lease()


def test_a_checkpoint_deepspeed_cannot_load_is_a_one_line_error(tmp_path: Path) -> None:
    from pretrain.storage.checkpoint import CheckpointError

    j, world = job(tmp_path), World()
    store = open_store(j, tmp_path / "work", world)
    ckpt = Checkpointer(j, tmp_path / "work", world, store)
    loader = DistributedLoader(IndexSplit(10), rank=0, world_size=1, micro_batch=1, accumulation=1, seed=0)
    ckpt.save(FileEngine(1.0), loader, 2, background=False)
    store.close()
    (tmp_path / "ckpt" / step_name(2) / "model.json").unlink()  # gone after it verified: DeepSpeed finds nothing
    with pytest.raises(CheckpointError, match=r"step-00000002: DeepSpeed could not load it"):
        Checkpointer(j, tmp_path / "work", world, store).load(FileEngine(0.0), loader, 2, "direct", [])


def tiny_model() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2, use_cache=False)
    model = GPT2LMHeadModel._from_config(cfg, attn_implementation="eager")
    model.loss_type = "ForCausalLM"
    return model


def test_the_evaluator_reports_the_mean_loss_and_leaves_the_model_training(tmp_path: Path) -> None:
    model = tiny_model().train()
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 64, (3, 16), dtype=np.int64) for _ in range(4)]
    collate = Collator(objective="clm", vocab_size=64, mask_token_id=None, special_ids=())
    objective = job(tmp_path).spec.objective
    scores = Evaluator(objective, World(), collate=collate, lm_batches=batches)(model)
    assert model.training
    with torch.no_grad():
        model.eval()
        want = [float(model(**{k: torch.from_numpy(v) for k, v in collate(b, step=EVAL_MASK_STREAM).items()}).loss)
                for b in batches]  # fmt: skip
    assert scores["loss"] == pytest.approx(sum(want) / len(want), rel=1e-9)
    assert scores["perplexity"] == pytest.approx(math.exp(scores["loss"]))
    assert Evaluator(objective, World(), collate=collate, lm_batches=[])(model) == {}


class PlainEngine:
    """A model and optimizer behind DeepSpeed's engine calls (forward, backward, step)."""

    def __init__(self, model: Any) -> None:
        self.model, self.opt, self.steps = model, torch.optim.SGD(model.parameters(), lr=0.1), 0

    def __call__(self, **batch: Any) -> Any:
        return self.model(**batch)

    def backward(self, loss: Any) -> None:
        loss.backward()

    def step(self) -> None:
        self.opt.step()
        self.opt.zero_grad()
        self.steps += 1


def test_a_step_returns_its_mean_loss_on_the_device_and_sync_reads_it_back(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model()
    collate = Collator(objective="clm", vocab_size=64, mask_token_id=None, special_ids=())
    rows = [np.arange(32, dtype=np.int64).reshape(2, 16) % 64, np.ones((2, 16), dtype=np.int64)]
    engine = PlainEngine(model)
    loss = train_step(engine, rows, collate, StepCall(0, 0, World().to_device))
    assert isinstance(loss, torch.Tensor) and loss.dtype == torch.float64 and engine.steps == 2
    sync = StepSync(World())
    monkeypatch.setattr(step_module.time, "monotonic", lambda: sync.last_sync)
    assert sync.exchange(False) == (False, False), "no second has passed"
    sync.add(StepResult(1, loss, 0.1, torch.tensor(2.0), 0.5, 0))
    sync.add(StepResult(2, torch.tensor(3.0, dtype=torch.float64), 0.1, None, 0.5, 0))
    rows_back = sync.flush()
    assert [r["step"] for r in rows_back] == [1, 2] and rows_back[0]["loss"] == float(loss)
    assert rows_back[0]["grad_norm"] == 2.0 and rows_back[1]["grad_norm"] is None and sync.flush() == []
    later = sync.last_sync + step_module.SYNC_SECONDS
    monkeypatch.setattr(step_module.time, "monotonic", lambda: later)
    assert sync.exchange(True) == (True, True), "one process: a stop and a due read-back take effect at once"


def _exchange_worker(rank: int, init: str, out: Any) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    sync = StepSync(World(rank=rank, size=2))
    agreed = []
    for step in range(1, 8):
        stop, _ = sync.exchange(rank == 1 and step >= 3)  # the signal reaches rank 1 during step 3
        agreed.append(stop)
        if stop:
            break
    sync.add(StepResult(len(agreed), torch.tensor(float(rank + 1), dtype=torch.float64), 0.1, None, 1.0, 0))
    out.put((rank, agreed, sync.flush()[0]["loss"]))
    sync.close()
    dist.destroy_process_group()


def test_every_rank_stops_after_the_same_step_one_step_after_the_signal(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [ctx.Process(target=_exchange_worker, args=(r, init, out)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    for _rank, agreed, loss in got:
        assert agreed == [False, False, False, True], "asked at step 3, agreed after step 4, on both ranks"
        assert loss == 1.5, "the read-back averages the ranks' losses"


def test_gpt2_uses_the_fused_tanh_gelu_which_is_gpt2s_function(tmp_path: Path) -> None:
    from transformers.activations import ACT2FN

    from pretrain.data.tokenizer import build_tokenizer
    from pretrain.trainer.model import model_config

    j = job(tmp_path, "tokenizer.type=bytes")
    config = model_config(j.spec, build_tokenizer(j.spec.tokenizer, "abc"))
    assert config.activation_function == "gelu_pytorch_tanh"
    x = torch.linspace(-8, 8, 10001, dtype=torch.float64)
    assert torch.allclose(ACT2FN["gelu_pytorch_tanh"](x), ACT2FN["gelu_new"](x), atol=1e-12)
