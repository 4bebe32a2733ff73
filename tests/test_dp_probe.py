"""The private linear probe: per-example gradients, DP-GD, its noise, its accounting and its export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedfm.privacy import probe
from fedfm.privacy.probe import FeatureTransform, Head


def _data(rows: int = 40, width: int = 7, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray, Head]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, width)) * rng.uniform(0.2, 3.0, size=(rows, 1))
    y = rng.integers(0, classes, size=rows)
    head = Head(rng.normal(size=(classes, width)) * 0.3, rng.normal(size=classes) * 0.3)
    return x, y, head


def _autograd_clipped_sum(head: Head, x: np.ndarray, y: np.ndarray, clip: float) -> tuple[np.ndarray, np.ndarray]:
    """Each row's gradient by autograd, clipped to ``clip`` by its norm over weight and bias, summed."""
    total_w, total_b = np.zeros_like(head.weight), np.zeros_like(head.bias)
    for xi, yi in zip(x, y, strict=True):
        w = torch.tensor(head.weight, requires_grad=True)
        b = torch.tensor(head.bias, requires_grad=True)
        loss = torch.nn.functional.cross_entropy((torch.tensor(xi) @ w.T + b)[None], torch.tensor([int(yi)]))
        gw, gb = torch.autograd.grad(loss, (w, b))
        norm = torch.sqrt((gw**2).sum() + (gb**2).sum())
        factor = min(1.0, clip / float(norm))
        total_w += factor * gw.numpy()
        total_b += factor * gb.numpy()
    return total_w, total_b


def test_clipped_per_example_gradients_equal_autograds() -> None:
    # Prepare: rows of very different norms, so some gradients are clipped and some not
    x, y, head = _data()
    _, norms = probe.per_example_gradients(head, x, y)
    clip = float(np.median(norms))

    # Execute
    grad_w, grad_b = probe.clipped_gradient_sum(head, x, y, clip)
    want_w, want_b = _autograd_clipped_sum(head, x, y, clip)

    # Assert
    assert (norms > clip).any() and (norms < clip).any()
    np.testing.assert_allclose(grad_w, want_w, atol=1e-6)
    np.testing.assert_allclose(grad_b, want_b, atol=1e-6)


def test_per_example_norms_equal_autograds() -> None:
    x, y, head = _data(rows=6)
    _, norms = probe.per_example_gradients(head, x, y)
    big = _autograd_clipped_sum  # with an unreachable bound nothing is clipped: the sum of raw gradients
    for i in range(len(y)):
        gw, gb = big(head, x[i : i + 1], y[i : i + 1], 1e9)
        assert norms[i] == pytest.approx(float(np.sqrt((gw**2).sum() + (gb**2).sum())), rel=1e-9)


def test_dp_gd_without_noise_or_clipping_is_full_batch_gradient_descent() -> None:
    # Prepare
    x, y, start = _data(rows=30)
    steps, lr = 25, 0.5

    # Execute: DP-GD with σ = 0 and a bound no gradient reaches; plain GD on the mean loss by autograd
    trained, taken = probe.dp_gd(x, y, head=start, steps=steps, learning_rate=lr, max_grad_norm=1e9,
                                 noise_multiplier=0.0)
    w = torch.tensor(start.weight, requires_grad=True)
    b = torch.tensor(start.bias, requires_grad=True)
    optimizer = torch.optim.SGD([w, b], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(torch.tensor(x) @ w.T + b, torch.tensor(y)).backward()
        optimizer.step()

    # Assert
    assert taken == steps
    np.testing.assert_allclose(trained.weight, w.detach().numpy(), atol=1e-10)
    np.testing.assert_allclose(trained.bias, b.detach().numpy(), atol=1e-10)
    assert not np.allclose(trained.weight, start.weight)


def test_noise_has_standard_deviation_sigma_c_over_n() -> None:
    # Prepare: one step from the same head with and without noise; their difference is -lr * noise / N
    rng = np.random.default_rng(0)
    rows, width, classes = 50, 400, 10
    x, y = rng.normal(size=(rows, width)), rng.integers(0, classes, size=rows)
    start = probe.zero_head(classes, width)
    sigma, clip, lr = 1.7, 0.3, 2.0

    # Execute
    clean, _ = probe.dp_gd(x, y, head=start, steps=1, learning_rate=lr, max_grad_norm=clip, noise_multiplier=0.0)
    noisy, _ = probe.dp_gd(x, y, head=start, steps=1, learning_rate=lr, max_grad_norm=clip, noise_multiplier=sigma,
                           rng=np.random.default_rng(1))
    noise = np.concatenate([(clean.weight - noisy.weight).ravel(), clean.bias - noisy.bias]) / lr

    # Assert: 4,010 coordinates, so the sample std is within ~3 % of the truth
    expected = sigma * clip / rows
    assert np.std(noise) == pytest.approx(expected, rel=0.06)
    assert abs(np.mean(noise)) < 4 * expected / np.sqrt(noise.size)


def test_dp_gd_draws_fresh_noise_without_a_generator() -> None:
    x, y, start = _data(rows=10)
    first, _ = probe.dp_gd(x, y, head=start, steps=1, learning_rate=1.0, max_grad_norm=1.0, noise_multiplier=1.0)
    second, _ = probe.dp_gd(x, y, head=start, steps=1, learning_rate=1.0, max_grad_norm=1.0, noise_multiplier=1.0)
    assert not np.allclose(first.weight, second.weight)


def test_stages_composed_in_one_opacus_history_stay_within_the_target() -> None:
    from opacus.accountants import RDPAccountant

    # Prepare: half the budget for 300 full-batch probe steps, the rest for 200 Poisson-sampled DP-SGD steps
    target, delta = 8.0, 1e-5
    sigma_probe = probe.probe_noise(target, delta, 300, share=0.5)
    history = probe.probe_history(sigma_probe, 300)

    # Execute
    sigma_next = probe.calibrate_next_stage(history, target, delta, sample_rate=0.05, steps=200)
    composed = probe.probe_history(sigma_probe, 0, [*history, (sigma_next, 0.05, 200)])

    # Assert: recomputed by a fresh Opacus accountant, not by fedfm's helpers
    alone, both = RDPAccountant(), RDPAccountant()
    alone.history = list(history)
    both.history = list(composed)
    assert history == [(sigma_probe, 1.0, 300)]
    assert alone.get_epsilon(delta) <= 0.5 * target * 1.001
    assert both.get_epsilon(delta) <= target
    # and the later stage is not wastefully noisy: 1 % less noise would overspend
    over = RDPAccountant()
    over.history = [*history, (sigma_next * 0.99, 0.05, 200)]
    assert over.get_epsilon(delta) > target


def test_calibrate_next_stage_refuses_a_spent_budget() -> None:
    history = probe.probe_history(0.3, 500)
    with pytest.raises(ValueError, match="nothing is left"):
        probe.calibrate_next_stage(history, 1.0, 1e-5, sample_rate=0.1, steps=10)


def test_row_normalization_does_not_fold() -> None:
    spec = FeatureTransform(np.zeros(3), scaling="row")
    with pytest.raises(ValueError, match="global scale"):
        probe.fold_transform(probe.zero_head(2, 3), spec)
    np.testing.assert_allclose(np.linalg.norm(probe.transform(np.ones((2, 3)), spec), axis=1), 1.0)


@pytest.mark.parametrize("pooling", ["cls", "mean", "layer-mean"])
def test_folded_head_in_the_model_gives_the_probes_logits(tiny_bert: Path, pooling: str) -> None:
    from datasets import Dataset

    from fedfm.adapters import get_adapter_state, load_model
    from fedfm.config import LoraSpec, ModelSpec
    from fedfm.tasks import get_task

    # Prepare: a real tiny model (peft-wrapped), rows tokenized by the task, a public centre
    task = get_task("sequence-classification")
    loaded = load_model(ModelSpec(name=str(tiny_bert), pooling=pooling), LoraSpec(r=4), task, num_labels=3,
                        side=f"probe-{pooling}")
    texts = ["chest pain at rest", "no symptoms today, normal ECG", "severe pain radiating to the left arm and jaw",
             "follow-up visit", "blood pressure 150 over 95", "shortness of breath on exertion"]
    rows = task.tokenize(Dataset.from_dict({"text": texts, "label": [0, 1, 2, 0, 1, 2]}), loaded.tokenizer,
                         max_length=32)
    centre, public = probe.public_centre(loaded.model, task, loaded.tokenizer, probe.public_texts("generic"),
                                         max_length=32, batch_size=8)
    spec = FeatureTransform(centre, probe.public_scale(public, centre))

    # Execute: features, a noisy DP-GD head, folded and written into the model
    x, y = probe.extract_features(loaded.model, task, rows, loaded.tokenizer, batch_size=4)
    z = probe.transform(x, spec)
    head, _ = probe.dp_gd(z, y, head=probe.zero_head(3, z.shape[1]), steps=5, learning_rate=1.0,
                          max_grad_norm=1.0, noise_multiplier=1.0, rng=np.random.default_rng(0))
    probe.write_head(loaded.model, probe.fold_transform(head, spec))
    loaded.model.eval()
    with torch.no_grad():
        batch = task.collate(loaded.tokenizer)([rows[i] for i in range(len(rows))])
        logits = loaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    # Assert
    assert x.shape == (6, 16) and list(y) == [0, 1, 2, 0, 1, 2]
    # The model runs in float32, the probe in float64: the folded bias b - W mu / s cancels large terms
    np.testing.assert_allclose(logits.numpy(), head.logits(z), rtol=1e-4, atol=1e-4)
    assert np.abs(head.logits(z)).max() > 0.1  # not trivially equal (a zero head)
    state = get_adapter_state(loaded.model)
    [weight_key] = [k for k in state if k.endswith("classifier.weight") or "classifier" in k and k.endswith("weight")]
    np.testing.assert_allclose(state[weight_key].numpy(), head.weight / spec.scale, atol=1e-6)
    probe.write_head(loaded.model, probe.zero_head(3, 16))  # the cached model back to a neutral head


def test_write_head_refuses_a_head_of_another_shape(tiny_bert: Path) -> None:
    from fedfm.adapters import load_model
    from fedfm.config import LoraSpec, ModelSpec
    from fedfm.tasks import get_task

    loaded = load_model(ModelSpec(name=str(tiny_bert)), LoraSpec(r=4), get_task("sequence-classification"),
                        num_labels=3, side="probe-shape")
    with pytest.raises(ValueError, match="shape"):
        probe.write_head(loaded.model, probe.zero_head(2, 16))


def test_public_texts_hold_no_rows_and_repeat() -> None:
    heart = probe.public_texts("heart-codebook", count=20)
    assert heart == probe.public_texts("heart-codebook", count=20)
    assert all(t.startswith("age ") and "chest pain: " in t for t in heart)
    with pytest.raises(ValueError, match="one of"):
        probe.public_texts("patients")
