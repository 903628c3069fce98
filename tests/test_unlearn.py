"""Shifted copies as distillation anchors: where they come from, and what they do."""

from __future__ import annotations

import pytest
import torch

from l2ul_cli.config import AttackConfig, UnlearnConfig, preset
from l2ul_cli.models import load_model
from l2ul_cli.anchors import class_blends, shifted_copies
from l2ul_cli.unlearn import ImageSet, unlearn


def test_shifted_copies_move_each_image_by_one_to_the_largest_shift():
    x = torch.zeros(3, 1, 9, 9)
    for i in range(3):
        x[i, 0, 4, 4] = i + 1  # one bright pixel per image, told apart by its value
    out = shifted_copies(x, 20, 2, torch.Generator().manual_seed(0))
    assert out.shape == (60, 1, 9, 9)
    seen = set()
    for row, img in enumerate(out):
        (y, xx), = (img[0] > 0).nonzero().tolist()
        assert img[0, y, xx] == row // 20 + 1  # copies of one image stay together, in order
        dy, dx = y - 4, xx - 4
        assert 1 <= max(abs(dy), abs(dx)) <= 2
        seen.add((dy, dx))
    assert len(seen) > 8
    # Larger shifts skip the small offsets that leave an image nearly as it was: at least half the largest.
    big = torch.zeros(1, 1, 40, 40)
    big[0, 0, 20, 20] = 1
    for img in shifted_copies(big, 50, 8, torch.Generator().manual_seed(1)):
        (y, xx), = (img[0] > 0).nonzero().tolist()
        assert 4 <= max(abs(y - 20), abs(xx - 20)) <= 8


def test_largest_shift_scales_with_the_image_side():
    cfg = UnlearnConfig()
    assert cfg.shift((1, 28, 28)) == 2 and cfg.shift((3, 224, 224)) == 16 and cfg.shift((1, 16, 16)) == 1
    assert cfg.shift((3, 8, 300)) == 1  # the shorter side, at least 1
    assert UnlearnConfig(shift_pixels=3).shift((1, 224, 224)) == 3
    assert preset("l2ul").shift_copies == 8 and preset("adv+imp").shift_copies == 0
    assert preset("l2ul").mix_copies == 8 and preset("adv+imp").mix_copies == 0


def test_stand_in_count_grows_with_the_forget_images_between_its_bounds():
    cfg = preset("l2ul")
    assert [cfg.stand_ins(k) for k in (1, 16, 32, 48, 64, 128, 1000)] == [256, 256, 256, 384, 512, 512, 512]
    # An explicit count is the count at every k; the paper's methods make none.
    assert preset("l2ul", synthetic_retain=100).stand_ins(128) == 100
    assert preset("l2ul", synthetic_retain=0).stand_ins(128) == 0
    assert preset("adv+imp").stand_ins(128) == 0


def test_distillation_weight_grows_with_the_forget_images_between_its_bounds():
    cfg = preset("l2ul")
    assert [cfg.adv_weight_for(k) for k in (1, 16, 20, 64, 125, 1000)] == [10, 10, 16, 51.2, 100, 100]
    # An explicit weight is the weight at every k; the paper's methods keep theirs.
    assert preset("l2ul", adv_weight=3.0).adv_weight_for(128) == 3.0
    assert preset("adv+imp").adv_weight_for(128) == 1.0
    # A run-away loss is retried at half the weight by the tool's preset only: the paper's methods
    # stop with an error, as measured in the benchmark.
    assert preset("l2ul").divergence_retries == 3 and preset("adv+imp").divergence_retries == 0


def _digits(digits, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    u8, y = digits
    x = torch.tensor(u8, dtype=torch.float32).unsqueeze(1) / 255.0
    return x[start:stop], torch.tensor(y[start:stop])


def _forget_digits(checkpoint, xf, yf, kept: int = 0, model=None, original=None, progress=None, **over):
    """The l2ul preset without stand-ins (and ``over``) forgets ``xf`` from ``model`` or a fresh
    copy of the checkpoint; its last ``kept`` rows are earlier requests' images."""
    model = model if model is not None else load_model(checkpoint, None, device=torch.device("cpu")).model
    cfg = preset("l2ul", **{"synthetic_retain": 0, **over})
    n = xf.shape[0] - kept
    keep = ImageSet(xf[n:], yf[n:], yf[n:]) if kept else None
    r = unlearn(model, xf[:n], yf[:n], goal="forget", num_classes=10, config=cfg, attack=AttackConfig(n_adv=4, steps=10),
                seed=0, precision="fp32", keep=keep, original=original, progress=progress)
    return model, r


def test_unlearn_makes_the_scaled_number_of_stand_ins(digits_checkpoint, digits):
    xf, yf = _digits(digits, 0, 6)
    _, r = _forget_digits(digits_checkpoint, xf, yf, synthetic_per_image=3, synthetic_retain_max=12,
                          synthetic_steps=2, max_steps=5)
    assert r.projection.startswith("12 stand-in images")  # 3 per image, 18, capped at 12


def test_unlearn_distils_with_the_weight_for_its_number_of_images(digits_checkpoint, digits):
    """Six images at 1 per image past 3, bounded to [2, 5]: the run is the one at weight 5, not at 2."""
    xf, yf = _digits(digits, 0, 6)
    scaled = _forget_digits(digits_checkpoint, xf, yf, adv_weight=2.0, adv_weight_images=3, adv_weight_per_image=1.0,
                            adv_weight_max=5.0)[1]
    fixed = _forget_digits(digits_checkpoint, xf, yf, adv_weight=5.0)[1]
    floor = _forget_digits(digits_checkpoint, xf, yf, adv_weight=2.0)[1]
    assert scaled.loss_history == fixed.loss_history
    assert floor.loss_history != fixed.loss_history


class _BreakAtUpdates:
    """A progress sink that breaks the model as the updates begin: the head's bias then puts
    every image in class 0, as a run gone wrong would, whatever this CPU's numerics."""

    def __init__(self, model):
        self.model = model

    def start(self, phase, total, unit="images"):
        if phase == "updates":
            head = [m for m in self.model.modules() if isinstance(m, torch.nn.Linear)][-1]
            with torch.no_grad():
                head.bias[0] += 1e4

    def advance(self, n=1):
        pass

    def finish(self):
        pass


def test_stand_in_agreement_is_against_the_model_before_the_updates(digits_checkpoint, digits):
    """No update step: every stand-in keeps its prediction. A model broken after the stand-ins
    were made (every image now class 0): only those predicted 0 before do."""
    from conftest import FORGET_IDX

    x, y = _digits(digits, 0, max(FORGET_IDX) + 1)
    xf, yf = x[FORGET_IDX], y[FORGET_IDX]
    over = dict(synthetic_retain=32, synthetic_steps=5)
    assert _forget_digits(digits_checkpoint, xf, yf, max_steps=0, **over)[1].agreement == 1.0
    model = load_model(digits_checkpoint, None, device=torch.device("cpu")).model
    broken = _forget_digits(digits_checkpoint, xf, yf, model=model, progress=_BreakAtUpdates(model), max_steps=2, **over)[1]
    assert broken.retained == "stand_ins" and broken.agreement < 0.5
    assert _forget_digits(digits_checkpoint, xf, yf, max_steps=0)[1].agreement is None  # no stand-ins


def _kept_on_probe(checkpoint, xf, yf, probe, probe_y, field: str) -> dict[int, float]:
    """Forget ``xf`` with 0 and with 8 anchors of one kind (``field``); each time the goal must
    be met, and the share of ``probe`` still classified as ``probe_y`` is returned."""
    kept = {}
    for copies in (0, 8):
        model, r = _forget_digits(checkpoint, xf, yf, **{field: copies})
        assert r.goal_met
        with torch.no_grad():
            kept[copies] = float((model(probe).argmax(1) == probe_y).float().mean())
    return kept


def test_shifted_anchors_keep_the_model_on_shifted_copies(digits_checkpoint, digits):
    """Forgetting digits with and without the anchors: both forget the exact images; with them the
    model still knows more of the images' shifted copies (drawn apart, another seed)."""
    xf, yf = _digits(digits, 1500, 1512)
    with torch.no_grad():
        assert (load_model(digits_checkpoint, None, device=torch.device("cpu")).model(xf).argmax(1) == yf).all()
    probe = shifted_copies(xf, 6, 1, torch.Generator().manual_seed(99))
    kept = _kept_on_probe(digits_checkpoint, xf, yf, probe, yf.repeat_interleave(6), "shift_copies")
    assert kept[8] >= 0.9 and kept[8] > kept[0] + 0.1, kept


def test_class_blends_mix_each_image_with_a_classmate():
    x = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1).expand(5, 1, 2, 2).contiguous()
    labels = torch.tensor([0, 0, 1, 2, 2])  # image 2 has no classmate
    out = class_blends(x, labels, 3, torch.Generator().manual_seed(0))
    assert out.shape == (12, 1, 2, 2)
    values = out[:, 0, 0, 0].view(4, 3)
    # image 0 blends with 1, image 1 with 0, images 3 and 4 with each other: weights 0.3-0.7
    for row, (own, mate) in zip(values, [(0, 1), (1, 0), (3, 4), (4, 3)]):
        w = (row - mate) / (own - mate)
        assert ((w >= 0.3 - 1e-6) & (w <= 0.7 + 1e-6)).all(), row
    assert class_blends(x[:1], labels[:1], 3, torch.Generator()) is None


def test_blend_anchors_keep_the_class_of_other_blends(digits_checkpoint, digits):
    """With blend anchors, blends of the forget images drawn apart (another seed) keep their
    class more often: what the anchors are for."""
    xf, yf = _digits(digits, 1500, 1520)
    probe = class_blends(xf, yf, 4, torch.Generator().manual_seed(99))
    probe_y = torch.cat([yf[i].repeat(4) for i in range(len(yf)) if (yf == yf[i]).sum() > 1])
    kept = _kept_on_probe(digits_checkpoint, xf, yf, probe, probe_y, "mix_copies")
    assert kept[8] > kept[0] + 0.1, kept




def test_importance_is_measured_on_the_new_images_unless_keep_importance(digits_checkpoint, digits, monkeypatch):
    """Earlier requests' images (the last ``kept`` rows) are forgotten already: by default the MAS
    importance comes from this request's images only; ``keep_importance`` counts them too."""
    import l2ul_cli.unlearn as unlearn_module

    seen = []
    real = unlearn_module.mas_importance

    def spy(model, x, **kw):
        seen.append(x.clone())
        return real(model, x, **kw)

    monkeypatch.setattr(unlearn_module, "mas_importance", spy)
    xf, yf = _digits(digits, 0, 6)
    for keep_importance in (False, True):
        _forget_digits(digits_checkpoint, xf, yf, kept=4, max_steps=2, keep_importance=keep_importance)
    assert torch.equal(seen[0], xf[:2]) and torch.equal(seen[1], xf)



def test_original_model_gives_the_teacher_and_the_penalty_anchor(digits_checkpoint, digits, monkeypatch):
    """``original`` (the network before a stream's first request): when the model is that network,
    the same result as without it; when the model has drifted, the distillation targets are the
    original's outputs and the importance penalty's θ̃ its weights."""
    import l2ul_cli.anchors as anchors_module
    import l2ul_cli.unlearn as unlearn_module

    fresh = lambda: load_model(digits_checkpoint, None, device=torch.device("cpu")).model  # noqa: E731
    xf, yf = _digits(digits, 40, 46)
    _, r = _forget_digits(digits_checkpoint, xf, yf, max_steps=30)
    _, r_same = _forget_digits(digits_checkpoint, xf, yf, original=fresh(), max_steps=30)
    assert r.steps == r_same.steps and torch.equal(r.logits, r_same.logits)

    first = fresh()
    drifted, _ = _forget_digits(digits_checkpoint, *_digits(digits, 0, 6))  # an earlier request
    called, anchors = [], []
    real_logits, real_penalty = anchors_module.logits_on, unlearn_module.ImportancePenalty

    def logits_spy(model, x, *a):
        called.append(model)
        return real_logits(model, x, *a)

    def penalty_spy(model, omega, lam, anchor=None):
        penalty = real_penalty(model, omega, lam, anchor=anchor)
        anchors.append(penalty.anchor)
        return penalty

    monkeypatch.setattr(anchors_module, "logits_on", logits_spy)
    monkeypatch.setattr(unlearn_module, "ImportancePenalty", penalty_spy)
    _, r2 = _forget_digits(digits_checkpoint, *_digits(digits, 6, 12), model=drifted, original=first, max_steps=3)
    assert r2.steps == 3
    # The attack's success is the drifted model's; every distillation target (adversarial,
    # shifted and blended copies) is the original's output.
    assert called[0] is drifted and len(called) >= 3 and all(m is first for m in called[1:])
    first_weights = dict(first.named_parameters())
    assert anchors[0] and all(torch.equal(w, first_weights[n]) for n, w in anchors[0].items())
    assert any(not torch.equal(w, dict(drifted.named_parameters())[n]) for n, w in anchors[0].items())


def _nan_from(calls: set[int] | int, monkeypatch) -> list[float]:
    """Make the adversarial term NaN on the given calls (a set) or on every call from one on
    (an int); returns the objective's value at each step, recorded as the loop computes it."""
    import l2ul_cli.loop as loop
    import l2ul_cli.unlearn as unlearn_module

    objective, adversarial = unlearn_module.objective_loss, loop.adversarial_loss
    seen: list[float] = []
    n = [0]

    def adv(*a, **kw):
        n[0] += 1
        bad = (n[0] - 1 in calls) if isinstance(calls, set) else n[0] - 1 >= calls
        return adversarial(*a, **kw) * float("nan") if bad else adversarial(*a, **kw)

    def obj(*a, **kw):
        v = objective(*a, **kw)
        seen.append(float(v.detach()))
        return v

    monkeypatch.setattr(loop, "adversarial_loss", adv)
    monkeypatch.setattr(unlearn_module, "objective_loss", obj)
    return seen


def test_a_divergence_goes_back_two_checkpoints_and_halves_the_distillation(digits_checkpoint, digits, monkeypatch):
    """NaN at step 7 with copies of the weights every 3 steps: back to the weights after step 3
    (the older copy), the weight 10 halved, and the run goes on to its goal."""
    xf, yf = _digits(digits, 0, 6)
    objective = _nan_from({7}, monkeypatch)
    _, r = _forget_digits(digits_checkpoint, xf, yf, divergence_retries=1, checkpoint_every=3)
    assert r.goal_met and r.adv_weight == 5.0
    assert [n for n in r.notes if "became nan" in n] == [
        "step 7: the loss became nan; went back to the weights after step 3 and halved the adversarial term's weight to 5"]
    assert objective[8] == objective[3]  # the same weights, the same forget images


def test_a_divergence_past_the_retries_is_an_error(digits_checkpoint, digits, monkeypatch):
    from l2ul_cli.errors import NumericalError

    xf, yf = _digits(digits, 0, 6)
    _nan_from(5, monkeypatch)
    with pytest.raises(NumericalError, match="--adv-weight"):
        _forget_digits(digits_checkpoint, xf, yf, divergence_retries=2, checkpoint_every=3)
    monkeypatch.undo()
    _nan_from(5, monkeypatch)
    with pytest.raises(NumericalError, match="at step 5"):  # the paper's behaviour: no retry
        _forget_digits(digits_checkpoint, xf, yf, divergence_retries=0)
