"""The reference SMA model: tokenizer, masking, loss, dropping, training and exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sma.data import synthetic_bytes, synthetic_features
from sma.masking import MaskingConfig
from sma.metrics import rmse, roc_auc
from sma.model import ModelConfig, SMAPredictor, SMAPretrainer, reconstruction_loss
from sma.tokens import SEP, VOCAB_SIZE, decode_token, encode, pad_batch
from sma.train import Dist, TrainConfig, finetune, pretrain

import sma_kernels

CPU = Dist(0, 1, torch.device("cpu"))
TINY = {"width": 32, "depth": 1, "heads": 2, "latents": 8, "widening": 1}


def _bytes_batch(seed: int = 0, batch: int = 6, length: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, VOCAB_SIZE, (batch, length), generator=gen)
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[1, 14:] = False  # right padding
    valid[2, :5] = False  # left padding
    valid[3, 7:10] = False  # padding in the middle
    return ids.masked_fill(~valid, 0), valid


def test_byte_vocabulary() -> None:
    ids = encode("CC(=O)é", max_len=64)
    assert VOCAB_SIZE == 262
    assert ids.tolist() == [b + 6 for b in "CC(=O)é".encode()] + [SEP]
    assert encode("ABCDEFGH", max_len=4).tolist() == [65 + 6, 66 + 6, 67 + 6, SEP]
    assert decode_token(ord("C") + 6) == "C" and decode_token(SEP) == "[SEP]"
    padded, valid = pad_batch([np.array([7, 8, 9]), np.array([10])])
    assert padded.tolist() == [[7, 8, 9], [10, 0, 0]]
    assert valid.tolist() == [[True, True, True], [True, False, False]]


def test_curriculum_schedule() -> None:
    guided = MaskingConfig("guided", curriculum=0.25)
    assert guided.noise(0, 100) == 1.0
    assert guided.noise(12, 100) == pytest.approx(0.5 * (1 + np.cos(np.pi * 12 / 25)))
    assert guided.noise(25, 100) == 0.0 and guided.noise(99, 100) == 0.0
    assert MaskingConfig("guided").noise(0, 100) == 0.0
    assert MaskingConfig("random", curriculum=0.25).noise(50, 100) == 1.0
    with pytest.raises(ValueError, match="strategy"):
        MaskingConfig("blocks")


@pytest.mark.parametrize("encoder", ["cross", "self"])
@pytest.mark.parametrize("strategy", ["guided", "random"])
def test_mask_counts_and_padding(encoder: str, strategy: str) -> None:
    model = SMAPretrainer(ModelConfig(max_len=32, encoder=encoder, **TINY),
                          MaskingConfig(strategy, ratio=0.3, num_per_query=2,
                                        mask_self=encoder == "self"))
    ids, valid = _bytes_batch()
    _, mask = model(ids, valid, generator=torch.Generator().manual_seed(1))
    n = valid.sum(1)
    expected = torch.clamp(torch.round(0.3 * n.double()), 1, None).long()
    assert torch.equal(mask.sum(1), expected)
    assert not (mask & ~valid).any()


def test_reconstruction_loss_ignores_unmasked_targets() -> None:
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(4, 10, generator=gen) < 0.3
    mask[0, 0] = True
    # Features: the gradient with respect to every unmasked target is exactly zero.
    prediction = torch.randn(4, 10, 1, generator=gen)
    target = torch.randn(4, 10, generator=gen, requires_grad=True)
    reconstruction_loss(prediction, target, mask, "features").backward()
    assert torch.all(target.grad[~mask] == 0)
    assert torch.all(target.grad[mask] != 0)
    # Bytes: changing the unmasked target ids leaves the loss unchanged.
    logits = torch.randn(4, 10, VOCAB_SIZE, generator=gen)
    ids = torch.randint(6, VOCAB_SIZE, (4, 10), generator=gen)
    other = torch.where(mask, ids, torch.randint(6, VOCAB_SIZE, (4, 10), generator=gen))
    assert torch.equal(reconstruction_loss(logits, ids, mask, "bytes"),
                       reconstruction_loss(logits, other, mask, "bytes"))
    changed = torch.where(mask, (ids + 1) % VOCAB_SIZE, ids)
    assert not torch.equal(reconstruction_loss(logits, ids, mask, "bytes"),
                           reconstruction_loss(logits, changed, mask, "bytes"))


@pytest.mark.parametrize("encoder", ["cross", "self"])
def test_decoding_only_masked_positions_equals_full_decoding(encoder: str) -> None:
    model = SMAPretrainer(ModelConfig(max_len=32, encoder=encoder, **TINY),
                          MaskingConfig(ratio=0.3, num_per_query=2))
    ids, valid = _bytes_batch()
    loss, mask = model(ids, valid, generator=torch.Generator().manual_seed(3))
    encoded = model.encoder(ids, valid, masking=True,
                            generator=torch.Generator().manual_seed(3))
    assert torch.equal(encoded.mask, mask)
    every = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    full = model.decoder(encoded, every)
    torch.testing.assert_close(loss, reconstruction_loss(full, ids, mask, "bytes"))


@pytest.mark.parametrize("encoder", ["cross", "self"])
def test_masked_tokens_do_not_reach_the_encoder_output(encoder: str) -> None:
    # Random masking depends only on the plan, so changing the masked tokens keeps the mask;
    # the encoder output must then be unchanged: nothing of a masked token leaks through.
    model = SMAPretrainer(ModelConfig(max_len=32, encoder=encoder, **TINY),
                          MaskingConfig("random", ratio=0.4, num_per_query=2))
    ids, valid = _bytes_batch()
    first = model.encoder(ids, valid, masking=True, generator=torch.Generator().manual_seed(5))
    other_ids = torch.where(first.mask, torch.randint(6, VOCAB_SIZE, ids.shape), ids)
    second = model.encoder(other_ids, valid, masking=True,
                           generator=torch.Generator().manual_seed(5))
    assert torch.equal(first.mask, second.mask)
    hidden = first.hidden[first.valid]
    torch.testing.assert_close(hidden, second.hidden[second.valid], rtol=0, atol=1e-6)


def test_drop_masked_with_padding_anywhere() -> None:
    ids, valid = _bytes_batch(batch=5)
    mask = torch.zeros_like(valid)
    mask[0, [0, 5, 19]] = True
    mask[2, [5, 6]] = True  # right after the left padding
    mask[3, [6, 10]] = True  # around the middle padding
    keep = valid & ~mask
    x = torch.randn(*ids.shape, 3, requires_grad=True)
    packed, packed_valid, index = sma_kernels.drop_masked(x, keep)
    assert packed.shape[1] == int(keep.sum(1).max())
    for b in range(ids.shape[0]):
        kept = torch.nonzero(keep[b]).flatten()
        count = len(kept)
        assert packed_valid[b].sum() == count and packed_valid[b, :count].all()
        assert torch.equal(index[b, :count], kept)
        assert torch.equal(packed[b, :count], x[b, kept])
        assert torch.all(packed[b, count:] == 0)
    packed.sum().backward()
    assert torch.equal(x.grad[..., 0], keep.float())


def test_predictor_ignores_padding_values() -> None:
    model = SMAPredictor(ModelConfig(max_len=32, encoder="self", **TINY)).eval()
    ids, valid = _bytes_batch()
    other = torch.where(valid, ids, torch.randint(6, VOCAB_SIZE, ids.shape))
    torch.testing.assert_close(model(ids, valid), model(other, valid), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("kind", "encoder"), [("bytes", "cross"), ("bytes", "self"),
                                               ("features", "self")])
def test_overfit_fixed_batch(kind: str, encoder: str) -> None:
    torch.manual_seed(0)
    if kind == "bytes":
        ids, valid = _bytes_batch()
        config = ModelConfig(max_len=32, encoder=encoder, **TINY)
    else:
        ids = torch.randn(8, 6)
        valid = torch.ones(8, 6, dtype=torch.bool)
        config = ModelConfig(input_kind="features", max_len=6, encoder=encoder, **TINY)
    # Random masking with one generator seed for every step fixes the masked positions (a guided
    # mask would move as the attention learns), so the batch and its targets stay the same.
    model = SMAPretrainer(config, MaskingConfig("random", ratio=0.3, num_per_query=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss, _ = model(ids, valid, generator=torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def _assert_same_parameters(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


@pytest.mark.parametrize("kind", ["bytes", "features"])
def test_pretrain_resume_is_exact(tmp_path, kind: str) -> None:
    corpus = synthetic_bytes(64) if kind == "bytes" else synthetic_features(64)
    config = ModelConfig(input_kind=kind, max_len=corpus.length, encoder="self", **TINY)
    masking = MaskingConfig("guided", ratio=0.3, num_per_query=2, mask_self=True, curriculum=0.5)
    train = TrainConfig(steps=8, batch_size=16, warmup=2, lr=1e-3, seed=3)
    whole = pretrain(corpus, kind, config, masking, train, tmp_path / "whole", dist=CPU, progress=False)
    pretrain(corpus, kind, config, masking, TrainConfig(**{**train.__dict__, "stop_at": 3}),
             tmp_path / "split", dist=CPU, progress=False)
    resumed = pretrain(corpus, kind, config, masking, train, tmp_path / "split", dist=CPU,
                       resume=True, progress=False)
    assert resumed["losses"] == whole["losses"] and len(whole["losses"]) == 8
    whole_state, split_state = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=False)["run"]
                                for d in ("whole", "split"))
    _assert_same_parameters(whole_state["model"], split_state["model"])
    assert split_state["step"] == 8


def test_finetune_resume_is_exact(tmp_path) -> None:
    from sma.data import load_task
    task = load_task("synthetic-features")
    config = ModelConfig(input_kind="features", max_len=8, encoder="self", **TINY)
    train = TrainConfig(steps=6, batch_size=32, warmup=2, lr=1e-3, seed=1)
    whole = finetune(task, train, tmp_path / "whole", dist=CPU, model_config=config, progress=False)
    finetune(task, TrainConfig(**{**train.__dict__, "stop_at": 4}), tmp_path / "split", dist=CPU,
             model_config=config, progress=False)
    resumed = finetune(task, train, tmp_path / "split", dist=CPU, model_config=config, resume=True,
                       progress=False)
    assert resumed["losses"] == whole["losses"]
    assert resumed["eval"] == whole["eval"]


def test_metrics() -> None:
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert roc_auc(np.array([1.0, 1.0]), np.array([0, 1])) == 0.5  # ties count one half
    assert rmse(np.array([1.0, 3.0]), np.array([0.0, 0.0])) == pytest.approx(np.sqrt(5.0))
    with pytest.raises(ValueError):
        roc_auc(np.array([0.1, 0.2]), np.array([1, 1]))
