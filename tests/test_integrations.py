"""crossent inside transformers and TRL: tiny random-init models built from configs (nothing
downloaded), each trained with and without the patch, compared loss by loss and gradient by
gradient."""

from __future__ import annotations

import copy
import tempfile
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
import crossent.integrations.transformers as cx  # noqa: E402

V, D = 300, 32
SMALL = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


def _configs() -> dict[str, Any]:
    tf = transformers
    common = {"vocab_size": V, "hidden_size": D, "intermediate_size": 64, **SMALL}
    return {
        "llama": tf.LlamaConfig(**common),
        "mistral": tf.MistralConfig(**common),
        "qwen2": tf.Qwen2Config(**common),
        "qwen3": tf.Qwen3Config(**common, head_dim=8),
        "gemma": tf.GemmaConfig(**common, head_dim=8),
        "gemma2": tf.Gemma2Config(**common, head_dim=8, final_logit_softcapping=5.0),
        "gemma3_text": tf.Gemma3TextConfig(**common, head_dim=8, final_logit_softcapping=5.0),
        "phi3": tf.Phi3Config(**common, resid_pdrop=0.0, embd_pdrop=0.0, pad_token_id=0),
        "gpt2": tf.GPT2Config(vocab_size=V, n_embd=D, n_layer=2, n_head=4, resid_pdrop=0.0,
                              embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=0,
                              bos_token_id=0),  # fmt: skip
    }


FAMILIES = list(_configs())


def _model(family: str, dtype: torch.dtype = torch.float32) -> Any:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(_configs()[family]).to(dtype)


def _batch(seed: int, b: int = 2, t: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt that is not trained on
    return ids, labels


def _pair(family: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    stock = _model(family, dtype)
    patched = copy.deepcopy(stock)
    cx.apply(patched)
    return stock, patched


def _grads(model: Any) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.grad is not None]


# ---- loss and gradients, step after step -----------------------------------------------------


@pytest.mark.parametrize("accumulate", [1, 3], ids=["one-batch", "accumulated"])
@pytest.mark.parametrize("family", FAMILIES)
def test_training_matches_the_stock_model(family: str, accumulate: int) -> None:
    # a few SGD steps, each over `accumulate` micro-batches normalised as the Trainer does
    # (num_items_in_batch: the kept tokens of the whole step)
    stock, patched = _pair(family)
    opts = [torch.optim.SGD(m.parameters(), lr=0.2) for m in (stock, patched)]
    for step in range(3):
        batches = [_batch(10 * step + i) for i in range(accumulate)]
        n_items = sum(int((lab[:, 1:] != -100).sum()) for _, lab in batches)
        losses = []
        for model, opt in zip((stock, patched), opts, strict=True):
            model.train()
            opt.zero_grad()
            total = 0.0
            for ids, labels in batches:
                kw = {"num_items_in_batch": torch.tensor(n_items)} if accumulate > 1 else {}
                out = model(input_ids=ids, labels=labels, **kw)
                out.loss.backward()
                total += out.loss.item()
                assert out.loss.dtype == torch.float32
            losses.append(total)
            grads = _grads(model)
            opt.step()
            if model is stock:
                stock_grads = grads
            else:
                assert out.logits is None  # never materialised
                assert len(grads) == len(stock_grads)
                for a, b in zip(grads, stock_grads, strict=True):
                    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_bfloat16_model_reports_a_float32_loss() -> None:
    # transformers upcasts the logits: the loss is float32, not rounded to bfloat16
    stock, patched = _pair("llama", torch.bfloat16)
    ids, labels = _batch(0)
    stock.train()
    patched.train()
    a = stock(input_ids=ids, labels=labels).loss
    b = patched(input_ids=ids, labels=labels).loss
    assert a.dtype == b.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert b.item() != b.to(torch.bfloat16).float().item()


def test_head_bias_and_tied_embeddings() -> None:
    stock = _model("llama")
    stock.lm_head = torch.nn.Linear(D, V, bias=True)
    stock.lm_head.weight = stock.model.embed_tokens.weight  # tied
    patched = copy.deepcopy(stock)
    cx.apply(patched)
    ids, labels = _batch(1)
    for m in (stock, patched):
        m.train()
        m(input_ids=ids, labels=labels).loss.backward()
    assert patched.lm_head.weight is patched.model.embed_tokens.weight
    torch.testing.assert_close(patched.lm_head.bias.grad, stock.lm_head.bias.grad)
    for a, b in zip(_grads(patched), _grads(stock), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---- everything else is the stock model's -----------------------------------------------------


def test_without_labels_or_in_eval_the_model_is_unchanged() -> None:
    stock, patched = _pair("gemma2")
    ids, labels = _batch(2)
    for m in (stock, patched):
        m.eval()
    torch.testing.assert_close(patched(input_ids=ids).logits, stock(input_ids=ids).logits)
    out = patched(input_ids=ids, labels=labels)  # evaluation keeps the logits for metrics
    ref = stock(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out.loss, ref.loss)
    patched.train()
    stock.train()
    last = patched(input_ids=ids, logits_to_keep=1).logits
    torch.testing.assert_close(last, stock(input_ids=ids, logits_to_keep=1).logits)


def test_fused_in_eval_when_asked() -> None:
    stock = _model("qwen2")
    patched = cx.apply(copy.deepcopy(stock), fused=True)
    ids, labels = _batch(3)
    with torch.no_grad():
        out = patched.eval()(input_ids=ids, labels=labels)
        ref = stock.eval()(input_ids=ids, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref.loss)


def test_shift_labels_logits_to_keep_and_tuples() -> None:
    stock, patched = _pair("mistral")
    ids, labels = _batch(4)
    stock.train()
    patched.train()
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    torch.testing.assert_close(
        patched(input_ids=ids, shift_labels=shifted, labels=labels).loss,
        stock(input_ids=ids, shift_labels=shifted, labels=labels).loss,
    )
    # logits_to_keep with labels of the kept positions only
    keep = 4
    lab = labels[:, -keep:].contiguous()
    out = patched(input_ids=ids, labels=lab, logits_to_keep=keep, shift_labels=lab)
    ref = stock(input_ids=ids, labels=lab, logits_to_keep=keep, shift_labels=lab)
    torch.testing.assert_close(out.loss, ref.loss)
    with pytest.raises(ValueError, match="batch_size"):  # mismatched labels: transformers' error
        patched(input_ids=ids, labels=labels, logits_to_keep=keep)
    with pytest.raises(ValueError, match="batch_size"):
        stock(input_ids=ids, labels=labels, logits_to_keep=keep)
    tup = patched(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(tup, tuple)
    torch.testing.assert_close(tup[0], stock(input_ids=ids, labels=labels).loss)


def test_a_custom_loss_function_is_kept() -> None:
    stock, patched = _pair("llama")
    calls = []

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, **kw: Any) -> Any:
        calls.append(logits.shape)
        return logits.float().mean()

    patched.loss_function = loss_fn
    patched.train()
    ids, labels = _batch(5)
    out = patched(input_ids=ids, labels=labels)
    assert calls and out.logits is not None


def test_unsupported_models_and_class_patching() -> None:
    cfg = transformers.OPTConfig(vocab_size=V, hidden_size=D, num_hidden_layers=1,
                                 ffn_dim=64, num_attention_heads=4)  # fmt: skip
    with pytest.raises(ValueError, match="supported"):
        cx.apply(transformers.AutoModelForCausalLM.from_config(cfg))
    cls = transformers.Qwen3ForCausalLM
    original = cls.forward
    stock = _model("qwen3")
    cx.apply_to_model_class(cls)
    try:
        patched = _model("qwen3")
        ids, labels = _batch(6)
        out = patched.train()(input_ids=ids, labels=labels)
        assert out.logits is None
        torch.testing.assert_close(out.loss, stock.train()(input_ids=ids, labels=labels).loss)
    finally:
        cx.revert_model_class(cls)
    assert cls.forward is original
    model = cx.apply(_model("llama"))
    cx.revert(model)
    assert "forward" not in model.__dict__


# ---- transformers.Trainer ----------------------------------------------------------------------


class _Rows(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, n: int) -> None:
        self.rows = [_batch(100 + i, b=1, t=7 + i % 3) for i in range(n)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, labels = self.rows[i]
        return {"input_ids": ids[0], "labels": labels[0]}


def _collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    t = max(len(r["input_ids"]) for r in rows)
    ids = torch.stack([torch.nn.functional.pad(r["input_ids"], (0, t - len(r["input_ids"])))
                       for r in rows])  # fmt: skip
    labels = torch.stack([torch.nn.functional.pad(r["labels"], (0, t - len(r["labels"])),
                                                  value=-100) for r in rows])  # fmt: skip
    return {"input_ids": ids, "labels": labels}


def _train(model: Any, accumulate: int) -> tuple[list[float], list[torch.Tensor]]:
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out, per_device_train_batch_size=2, gradient_accumulation_steps=accumulate,
            max_steps=3, learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True,
            save_strategy="no", seed=0, dataloader_num_workers=0,
        )  # fmt: skip
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=_Rows(12), data_collator=_collate
        )
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_trainer_matches_the_stock_model(accumulate: int) -> None:
    stock, patched = _pair("llama")
    ref_losses, ref_params = _train(stock, accumulate)
    losses, params = _train(patched, accumulate)
    assert losses == pytest.approx(ref_losses, rel=1e-4)
    for a, b in zip(params, ref_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---- TRL ---------------------------------------------------------------------------------------


def _sft(model: Any, use_crossent: bool) -> list[dict[str, float]]:
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from tokenizers import Tokenizer, models, pre_tokenizers

    import crossent.integrations.trl as ctrl

    vocab = {f"w{i}": i for i in range(V - 2)} | {"<pad>": V - 2, "<eos>": V - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    ptok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>"
    )
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, V - 2, (6 + i % 5,), generator=g).tolist()}
            for i in range(16)]  # fmt: skip
    if use_crossent:
        ctrl.apply()
    try:
        with tempfile.TemporaryDirectory() as out:
            args = trl.SFTConfig(
                output_dir=out, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                max_steps=3, learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True,
                save_strategy="no", seed=0, dataloader_num_workers=0,
            )  # fmt: skip
            trainer = trl.SFTTrainer(
                model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                processing_class=ptok,
            )  # fmt: skip
            trainer.train()
    finally:
        ctrl.revert()
    return [h for h in trainer.state.log_history if "loss" in h]


def test_trl_sft_trainer_with_crossent_head(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("trl")
    import crossent.integrations.trl as ctrl

    calls: list[int] = []
    real = ctrl.linear_token_stats

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ctrl, "linear_token_stats", counted)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=D, intermediate_size=64, **SMALL, pad_token_id=V - 2,
        eos_token_id=V - 1, bos_token_id=None,
    )  # fmt: skip
    base = transformers.LlamaForCausalLM(cfg)
    theirs = _sft(copy.deepcopy(base), use_crossent=False)
    assert not calls
    ours = _sft(copy.deepcopy(base), use_crossent=True)
    assert calls  # crossent's head computed the loss
    assert len(ours) == len(theirs) == 3
    for a, b in zip(ours, theirs, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)
        assert a["entropy"] == pytest.approx(b["entropy"], rel=1e-3)
        assert a["mean_token_accuracy"] == pytest.approx(b["mean_token_accuracy"], abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_grpo_log_probabilities_and_entropy_from_hidden_states(temperature: float) -> None:
    # what TRL's GRPO computes from the full logits, from the hidden states instead
    pytest.importorskip("trl")
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    from crossent.integrations.trl import token_logps_and_entropy

    model = _model("gemma2", torch.float64)
    ids, _ = _batch(7, b=3, t=11)
    hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
    completion = ids[:, 1:]
    h1 = hidden.detach().requires_grad_()
    logits = model.lm_head(h1)
    cap = model.config.final_logit_softcapping
    logits = cap * torch.tanh(logits / cap) / temperature
    ref_lp = selective_log_softmax(logits, completion)
    ref_ent = entropy_from_logits(logits)
    h2 = hidden.detach().requires_grad_()
    lp, ent = token_logps_and_entropy(h2, model.lm_head, completion, temperature=temperature,
                                      softcap=cap)  # fmt: skip
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(ent, ref_ent)
    g = torch.Generator().manual_seed(1)
    w1 = torch.rand(lp.shape, generator=g, dtype=lp.dtype)
    w2 = torch.rand(lp.shape, generator=g, dtype=lp.dtype)
    (ref_lp * w1 + ref_ent * w2).sum().backward()
    (lp * w1 + ent * w2).sum().backward()
    torch.testing.assert_close(h2.grad, h1.grad)

