"""RegrowCallback in the Hugging Face Trainer, on small randomly initialised BERT and GPT-2
models (configs built here: nothing is downloaded)."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel,  # noqa: E402
                          Trainer, TrainerCallback, TrainingArguments)

import regrow  # noqa: E402
from regrow.integrations.transformers import STATE_NAME, RegrowCallback, default_targets  # noqa: E402

SPARSITY = 0.8


class Tokens(torch.utils.data.Dataset):
    """Random token sequences with a label (BERT) or as their own targets (GPT-2)."""

    def __init__(self, n=32, length=8, lm=False):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 64, (n, length), generator=g)
        self.y = torch.randint(0, 2, (n,), generator=g)
        self.lm = lm

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i] if self.lm else self.y[i]}


class Watch(TrainerCallback):
    """Listed after RegrowCallback: checks every optimizer step's weights against the masks."""

    def __init__(self, regrow_cb):
        self.regrow_cb, self.steps, self.nonzero_masked, self.itop_start = regrow_cb, 0, 0, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.itop_start = self.regrow_cb.dst.stats()["itop_rate"]

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        params = dict(model.named_parameters())
        for name, mask in self.regrow_cb.dst.masks.items():
            self.nonzero_masked += int((params[name].detach()[~mask] != 0).sum())
        self.steps += 1


def bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16))


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=16,
                                      bos_token_id=0, eos_token_id=0))


def train(model, out, *, max_steps, data, resume=None, save_steps=100, after=(), **options):
    cb = RegrowCallback(method=options.pop("method", "rigl"), sparsity=SPARSITY, update_interval=2, **options)
    watch = Watch(cb)
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, learning_rate=1e-3, logging_steps=2,
                             save_steps=save_steps, report_to="none", use_cpu=True, seed=0,
                             disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[cb, watch, *after])
    trainer.train(resume_from_checkpoint=resume)
    return cb, watch, trainer


def test_bert_trains_sparse_and_resumes_bit_for_bit(tmp_path):
    model = bert()
    cb, watch, trainer = train(model, tmp_path / "run", max_steps=8, save_steps=4, data=Tokens())
    stats = cb.dst.stats()
    # every optimizer step (8, each of 2 accumulated batches) left masked weights exactly zero
    assert watch.steps == 8 and cb.dst.step_count == 8 and watch.nonzero_masked == 0
    assert abs(stats["nnz"] - (1 - SPARSITY) * stats["numel"]) <= len(stats["layers"])
    assert stats["updates"] == 2 and stats["itop_rate"] > watch.itop_start   # updates at steps 2 and 4
    # embeddings and layer norms stay dense; attention and MLP projections are sparsified
    assert not any("embeddings" in n or "LayerNorm" in n for n in cb.dst.masks)
    assert "bert.encoder.layer.0.attention.self.query.weight" in cb.dst.masks
    # the Trainer's log records carry regrow's values
    logged = [r for r in trainer.state.log_history if "loss" in r]
    assert logged and all(r["regrow/density"] == pytest.approx(stats["density"]) for r in logged)
    assert logged[-1]["regrow/updates"] == 2

    # an interrupted run: a fresh model resumed from the step-4 checkpoint ends identical
    resumed = bert()
    assert (tmp_path / "run" / "checkpoint-4" / STATE_NAME).is_file()
    cb2, watch2, _ = train(resumed, tmp_path / "run", max_steps=8, data=Tokens(),
                           resume=str(tmp_path / "run" / "checkpoint-4"))
    assert watch2.steps == 4 and cb2.dst.step_count == 8 and watch2.nonzero_masked == 0
    final, again = model.state_dict(), resumed.state_dict()
    assert all(torch.equal(final[k], again[k]) for k in final)
    assert all(torch.equal(cb.dst.masks[n], cb2.dst.masks[n]) for n in cb.dst.masks)


def test_gpt2_trains_with_its_conv1d_projections_sparse(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers.integrations import TensorBoardCallback

    model = gpt2()
    board = TensorBoardCallback()   # listed after RegrowCallback: it sees the regrow/ values (README)
    board.logging_dir = str(tmp_path / "tb")
    cb, watch, _ = train(model, tmp_path / "gpt2", max_steps=4, data=Tokens(lm=True), method="set",
                         dense_layers=["transformer.h.1.mlp.c_proj"], after=[board])
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/regrow/density")] == [2, 4]
    names = set(cb.dst.masks)
    assert "transformer.h.0.attn.c_attn.weight" in names and "transformer.h.0.mlp.c_fc.weight" in names
    assert "transformer.h.1.mlp.c_proj.weight" not in names   # dense_layers by module name
    assert not any(n.startswith(("transformer.wte", "transformer.wpe", "lm_head")) or ".ln_" in n for n in names)
    assert watch.nonzero_masked == 0 and cb.dst.stats()["itop_rate"] > watch.itop_start


def test_targets_by_module_name_and_conv1d_defaults():
    model = gpt2()
    opt = torch.optim.AdamW(model.parameters())
    dst = regrow.DynamicSparsity(model, opt, method="static", sparsity=0.5, total_steps=4,
                                 targets=["transformer.h.1.attn", "transformer.h.0.mlp.c_fc"])
    assert sorted(dst.masks) == ["transformer.h.0.mlp.c_fc.weight", "transformer.h.1.attn.c_attn.weight",
                                 "transformer.h.1.attn.c_proj.weight"]
    assert default_targets(bert(), "rigl") is None   # no Conv1D: regrow's own default applies
    with pytest.raises(ValueError, match="Conv1D"):
        default_targets(model, "srigl")


def test_resume_without_regrow_state_says_so(tmp_path):
    cb = RegrowCallback(method="rigl", sparsity=0.5)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    state = transformers.TrainerState(global_step=4)
    with pytest.raises(FileNotFoundError, match="resume_from"):
        cb._resume_file(args, state)
    with pytest.raises(ValueError, match="total_steps"):
        RegrowCallback(method="rigl", sparsity=0.5, total_steps=10)
