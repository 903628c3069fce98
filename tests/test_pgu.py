"""--method pgu on the digits model: the index less the forget images, projected plain SGD, the
code's objective and stop rule, and the tool's goal as an option."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import FORGET_IDX
from l2ul_cli.errors import UsageError
from l2ul_cli.evaluate import predict
from l2ul_cli.index import build_index
from l2ul_cli.pgu import PGUConfig, pgu_objective, pgu_unlearn


@pytest.fixture(scope="module")
def setup(digits_checkpoint, digits):
    from l2ul_cli.models import load_model

    loaded = load_model(digits_checkpoint)
    u8, y = digits
    x = torch.tensor(u8, dtype=torch.float32).unsqueeze(1) / 255.0
    index = build_index(loaded.model, x[:1500].split(250), energy=0.9999, sha256=loaded.source.sha256,
                        source="1500 training digits")
    return loaded.model, x, torch.tensor(y), index


def _run(setup, config: PGUConfig, heldout: bool = True, forget=FORGET_IDX):
    model, x, y, index = setup
    model = copy.deepcopy(model)
    before = predict(model, x.split(500), "cpu").argmax(1)
    result = pgu_unlearn(model, x[forget], y[forget], index, goal="forget", config=config,
                         heldout=(x[1500:], y[1500:]) if heldout else None)
    after = predict(model, x.split(500), "cpu").argmax(1)
    others = torch.ones(1500, dtype=torch.bool)
    others[forget] = False
    kept = float((after[:1500][others] == before[:1500][others]).float().mean())
    return result, kept


def test_pgu_as_its_code_stops_where_forget_accuracy_crosses_the_heldout_level(setup):
    """63 images (accuracy in steps of 1/63); at the code's lr 0.05 this confident net's softmax
    hardly moves in 100 epochs (seen: forget accuracy 0.95), so 0.5. Where it crosses, and what the
    rest keeps, differ from CPU to CPU (seen over 5 fixture seeds: kept 0.78-1.00), so the test
    holds the rule: stop at the first epoch whose gap is positive and keep the weights of whichever
    of it and the epoch before lies nearer the held-out level."""
    forget = list(range(0, 1500, 24))
    result, _ = _run(setup, PGUConfig(start_lr=0.5, end_lr=0.1), forget=forget)
    gaps = result.gap_history
    assert result.steps == result.epochs == len(gaps) - 1 > 0  # 63 images: one batch per epoch
    assert result.stopped.startswith("forget accuracy fell below held-out accuracy")
    assert gaps[-1] > 0 and all(g <= 0 for g in gaps[:-1])
    final = result.heldout_accuracy - result.forget_accuracy
    assert final == pytest.approx(min(gaps[-2:], key=abs), abs=1e-6)
    assert result.reduced_index.images == 1500 - 63 and result.reduced_index.forgotten == 63
    assert "less 63 forgotten, γ 0.95" in result.projection


def test_pgu_with_the_goal_misclassifies_every_image_and_projection_keeps_the_rest(setup):
    config = PGUConfig(objective="margin", stop="goal", start_lr=0.1, end_lr=0.02, gamma=0.97)
    result, kept = _run(setup, config)
    assert result.goal_met and result.forget_accuracy == 0.0
    assert kept > 0.8  # seen over 5 fixture seeds: 0.88-0.99
    # The same updates unprojected (γ so small no direction is kept) break the model (seen: 0.10).
    _, kept_free = _run(setup, PGUConfig(objective="margin", stop="goal", start_lr=0.1, end_lr=0.02, gamma=1e-9))
    assert kept_free < kept - 0.3


def test_pgu_without_heldout_images_stops_at_the_goal_and_says_so(setup):
    result, _ = _run(setup, PGUConfig(objective="margin", stop="gap", start_lr=0.3, end_lr=0.06, gamma=0.97, epochs=3),
                     heldout=False)
    assert any("no held-out images" in n for n in result.notes)
    assert result.steps <= 3 and result.heldout_accuracy is None


def test_layers_at_gamma_one_are_held_and_relabel_needs_another_objective(setup):
    model, x, y, index = setup
    model = copy.deepcopy(model)
    first = next(n for n in index.layers)
    w = dict(model.named_modules())[first].weight.detach().clone()
    pgu_unlearn(model, x[FORGET_IDX], y[FORGET_IDX], index, config=PGUConfig(gamma_layers={first: 1.0}, epochs=2),
                heldout=(x[1500:], y[1500:]))
    assert torch.equal(dict(model.named_modules())[first].weight, w)
    with pytest.raises(UsageError, match="margin or ce"):
        pgu_unlearn(model, x[:2], y[:2], index, goal="relabel", config=PGUConfig())


def test_pgu_objective_is_the_codes():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1])
    p = torch.softmax(logits, 1)
    label = -torch.log(1 - (p[torch.arange(2), labels] - 0.05)).mean()
    entropy = -(p * torch.log(p)).sum(1).mean()
    assert float(pgu_objective(logits, labels, PGUConfig())) == pytest.approx(float(label - 0.2 * entropy), rel=1e-5)


def test_a_batch_that_does_not_fit_in_memory_runs_in_parts_with_the_same_steps(setup, monkeypatch):
    """A PGU batch larger than the free memory holds accumulates its parts' gradients: the same
    step as one pass, up to summation order."""
    from l2ul_cli import memory

    model = setup[0]
    config = PGUConfig(objective="margin", stop="goal", start_lr=0.1, end_lr=0.02, gamma=0.97, epochs=2)
    whole_model = copy.deepcopy(model)
    monkeypatch.setattr(memory, "free_bytes", lambda device: 10 ** 12)
    whole = pgu_unlearn(whole_model, setup[1][FORGET_IDX], setup[2][FORGET_IDX], setup[3], goal="forget", config=config)
    per = memory.saved_bytes_per_image(model, (1, 16, 16), torch.device("cpu"))
    monkeypatch.setattr(memory, "free_bytes", lambda device: int(3 * per / memory.SHARE))
    split_model = copy.deepcopy(model)
    split = pgu_unlearn(split_model, setup[1][FORGET_IDX], setup[2][FORGET_IDX], setup[3], goal="forget", config=config)
    assert not any("passes" in n for n in whole.notes)
    assert any("batch of 8 images ran in passes of 3" in n for n in split.notes), split.notes
    assert split.steps == whole.steps > 0
    assert split.loss_history == pytest.approx(whole.loss_history, rel=1e-4)
    moved = max((a - b).abs().max().item() for a, b in zip(whole_model.parameters(), model.parameters()))
    assert moved > 1e-4  # the steps did something to compare
    for a, b in zip(split_model.parameters(), whole_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
