"""Checkpoints: atomic writes, resume to the same end state, refusal of pickled payloads."""

from __future__ import annotations

import pickle

import pytest
import torch
from ignite.engine import Engine, Events

from custom.checkpoints import (
    BestModelSaver,
    FinalValidation,
    ResumableCheckpoint,
    atomic_torch_save,
    load_network_weights,
    safe_load,
)


def _trainer(model, opt, data):
    def step(engine, batch):
        opt.zero_grad()
        loss = ((model(batch[0]) - batch[1]) ** 2).mean()
        loss.backward()
        opt.step()
        return loss.item()

    return Engine(step)


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, generator=g)
    return [(x[i : i + 2], x[i : i + 2].sum(1, keepdim=True)) for i in range(0, 8, 2)]


def _model():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_resume_reaches_the_same_state_as_an_uninterrupted_run(tmp_path):
    data = _data()
    model, opt = _model()
    ref = _trainer(model, opt, data)
    ref.run(data, max_epochs=5)

    model2, opt2 = _model()
    first = _trainer(model2, opt2, data)
    ResumableCheckpoint(tmp_path, {"network": model2, "optimizer": opt2}).attach(first)
    first.run(data, max_epochs=3)  # "killed" after epoch 3

    model3, opt3 = _model()
    second = _trainer(model3, opt3, data)
    ResumableCheckpoint(tmp_path, {"network": model3, "optimizer": opt3}).attach(second)
    state = second.run(data, max_epochs=5)
    assert state.iteration == ref.state.iteration == 20
    assert torch.allclose(model3.weight, model.weight) and torch.allclose(model3.bias, model.bias)


def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_torch_save({"w": torch.ones(3)}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(safe_load(path)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


class _Payload:
    def __reduce__(self):
        return (print, ("this code ran while loading a checkpoint",))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"network": _Payload()}, f)
    with pytest.raises(ValueError, match="refusing to load"):
        safe_load(path)


def test_wrong_network_shape_gets_a_clear_error(tmp_path):
    atomic_torch_save(torch.nn.Linear(4, 1).state_dict(), tmp_path / "model.pt")
    with pytest.raises(ValueError, match="do not fit this network"):
        load_network_weights(torch.nn.Linear(3, 1), tmp_path / "model.pt")


def test_best_model_saver_keeps_the_best_and_survives_resume(tmp_path):
    model = torch.nn.Linear(3, 1)
    saver = BestModelSaver(model, tmp_path / "model.pt", metric_name="psnr")
    engine = Engine(lambda e, b: None)
    for score, bias in ((20.0, 1.0), (25.0, 2.0), (22.0, 3.0)):
        model.bias.data.fill_(bias)
        engine.state.metrics = {"psnr": score}
        saver(engine)
    assert safe_load(tmp_path / "model.pt")["bias"].item() == 2.0
    restored = BestModelSaver(model, tmp_path / "model.pt", metric_name="psnr")
    restored.load_state_dict(saver.state_dict())
    model.bias.data.fill_(4.0)
    engine.state.metrics = {"psnr": 24.0}
    restored(engine)
    assert safe_load(tmp_path / "model.pt")["bias"].item() == 2.0


class _Validator(Engine):
    """Like MONAI's evaluators, ``run()`` needs no data argument."""

    def run(self, data=(0,), **kwargs):
        return super().run(data, **kwargs)


def _validator(model: torch.nn.Module, best: BestModelSaver, scores: list[float]) -> Engine:
    """An evaluator whose run reports the next score of ``scores`` to ``best``."""
    def run(engine, batch):
        engine.state.metrics = {"gain": scores.pop(0)}

    validator = _Validator(run)
    validator.add_event_handler(Events.EPOCH_COMPLETED, best)
    return validator


def test_gate_keeps_model_pt_when_no_model_beats_identity(tmp_path):
    model = torch.nn.Linear(3, 1)
    torch.save({"shipped": torch.ones(1)}, tmp_path / "model.pt")
    best = BestModelSaver(model, tmp_path / "model.pt", metric_name="gain", min_score=0.0)
    validator = _validator(model, best, [-0.4, -0.1])
    final = FinalValidation(validator, best, tmp_path / "not_written.txt")
    trainer = Engine(lambda e, b: None)
    final.attach(trainer)
    validator.run()  # a validation before the last iteration: worse than identity
    trainer.run([0], max_epochs=1)  # the final weights were not validated: the final check does it
    assert "shipped" in safe_load(tmp_path / "model.pt") and best.best == -0.1 and not best.saved
    assert "was not written" in (tmp_path / "not_written.txt").read_text(encoding="utf-8")


def test_final_validation_runs_once_when_training_never_validated_and_a_good_model_is_written(tmp_path):
    model = torch.nn.Linear(3, 1)
    model.bias.data.fill_(5.0)
    (tmp_path / "not_written.txt").write_text("stale", encoding="utf-8")
    best = BestModelSaver(model, tmp_path / "model.pt", metric_name="gain", min_score=0.0)
    scores = [0.7]
    final = FinalValidation(_validator(model, best, scores), best, tmp_path / "not_written.txt")
    trainer = Engine(lambda e, b: None)
    final.attach(trainer)
    trainer.run([0], max_epochs=1)
    assert scores == [] and best.saved and safe_load(tmp_path / "model.pt")["bias"].item() == 5.0
    assert not (tmp_path / "not_written.txt").exists()
    restored = BestModelSaver(model, tmp_path / "model.pt", metric_name="gain", min_score=0.0)
    restored.load_state_dict(best.state_dict())
    assert restored.saved and restored.best == pytest.approx(0.7)


def test_best_model_saver_writes_the_validated_smoothing_with_the_weights(tmp_path):
    from custom.checkpoints import mean_smoothing_sigma, read_model_settings, sample_output_step, settings_path

    model = torch.nn.Linear(3, 1)
    path = tmp_path / "model.pt"
    assert mean_smoothing_sigma(path) == 0.0  # no weights and no settings: nothing was chosen
    saver = BestModelSaver(model, path, metric_name="gain", min_score=0.0, smoothing_metric="sigma")
    engine = Engine(lambda e, b: None)
    engine.state.metrics = {"gain": 0.8, "sigma": 0.75}
    saver(engine)
    assert mean_smoothing_sigma(path) == 0.75 and read_model_settings(path)["gain"] == pytest.approx(0.8)
    assert sample_output_step(path) == 1  # a training chooses no sampler: the whole chain
    # settings never outlive their weights: other weights at the same path are refused, not smoothed
    torch.save({"other": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="other weights"):
        mean_smoothing_sigma(path)
    # a saver that chooses no smoothing removes the stale settings beside the weights it writes
    BestModelSaver(model, path, metric_name="gain")(engine)
    assert not settings_path(path).exists() and mean_smoothing_sigma(path) == 0.0
    settings_path(path).write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not readable JSON"):
        mean_smoothing_sigma(path)
