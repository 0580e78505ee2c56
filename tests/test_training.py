"""The fine-tuning loop: seeded, resumable bit for bit, interventions and tracker wired in, old calls intact."""

import json

import pytest
import torch
from conftest import make_native, random_seqs

import reversion_lens as rl
from reversion_lens.directions import mean_difference
from reversion_lens.errors import ConfigError, NonFiniteError
from reversion_lens.interventions import active_interventions, block, residual_write_params
from reversion_lens.tracking import DriftTracker
from reversion_lens.training import Batch, FinetuneResult, OptimConfig, eval_mode, finetune, lm_loss, tracking_steps

L, D, V = 2, 32, 40


class Data:
    def __init__(self, vocab=V, seed=0):
        self.vocab, self.seed = vocab, seed

    def batch(self, step):
        g = torch.Generator().manual_seed(self.seed * 100003 + step)
        t = torch.randint(1, self.vocab, (4, 10), generator=g)
        loss_mask = torch.ones_like(t)
        loss_mask[:, :3] = 0
        return Batch(t, torch.ones_like(t), loss_mask)


def noisy_loss(model, batch):
    """The LM loss on a random half of the targets: the numbers depend on the torch RNG state."""
    keep = (torch.rand(batch.loss_mask.shape) < 0.5).long()
    return lm_loss(model, batch._replace(loss_mask=batch.loss_mask * keep))


class Killer:
    """A callback that raises once at ``step`` (a simulated kill) and records evaluations otherwise."""

    def __init__(self, step=None):
        self.step = step

    def __call__(self, step, model):
        if step == self.step:
            self.step = None
            raise KeyboardInterrupt(f"killed at step {step}")
        return {"w_sum": float(model.blocks[0].mlp.out.original_component.weight.detach().sum())}


@pytest.fixture(scope="module")
def setting():
    probes = rl.ProbeSet.from_tokens(random_seqs(6, vocab=V, seed=3))
    ref = rl.residual_stats(make_native(n_layers=L, d_model=D, d_vocab=V, seed=0), probes)
    base = rl.residual_stats(make_native(n_layers=L, d_model=D, d_vocab=V, seed=9), probes)
    return probes, ref, base, mean_difference(base, ref)


def run(setting, state_dir=None, kill=None, seed=0, steps=9, **kw):
    probes, ref, base, v = setting
    model = make_native(n_layers=L, d_model=D, d_vocab=V, seed=0)
    tracker = DriftTracker(probes, v, ref, base, keep_means=True)
    ivs = [block(model, v, "grad"), block(model, v, "update", layers=[1])]
    result = finetune(
        model,
        Data(),
        steps,
        optim=OptimConfig(lr=3e-3),
        loss_fn=noisy_loss,
        interventions=ivs,
        tracker=tracker,
        track_steps=(0, 1, 2, 5, steps),
        callbacks=[Killer(kill)],
        callback_steps=(3, 4, 7),
        seed=seed,
        state_dir=state_dir,
        save_every=2,
        progress=False,
        **kw,
    )
    return model, result, tracker


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_killed_and_resumed_equals_uninterrupted_bit_for_bit(setting, tmp_path):
    ref_model, ref_result, ref_tracker = run(setting)
    with pytest.raises(KeyboardInterrupt):
        run(setting, state_dir=tmp_path, kill=7)
    latest = json.loads((tmp_path / "latest.json").read_text())
    assert latest["step"] == 6  # save_every=2: the last checkpoint before the kill at 7
    model, result, tracker = run(setting, state_dir=tmp_path, keep_state=True)
    assert result.resumed_from == 6
    assert list(result) == list(ref_result) and len(result) == 9
    assert result.aux_losses == ref_result.aux_losses
    assert result.evals == ref_result.evals and [e["step"] for e in result.evals] == [3, 4, 7]
    assert tracker.records == ref_tracker.records and result.records == ref_result.records
    assert sorted(tracker.means) == [0, 1, 2, 5, 9]
    assert all(torch.equal(tracker.means[s], ref_tracker.means[s]) for s in tracker.means)
    assert same_weights(model, ref_model)
    # what is on disk: safetensors and JSON only, one checkpoint kept
    files = sorted(p.name for p in (tmp_path / "step_0000009").iterdir())
    assert files == ["extra.safetensors", "model.safetensors", "optimizer.safetensors", "trainer.json"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "latest.json",
        "run.json",
        "step_0000009",
    ]
    run_json = json.loads((tmp_path / "run.json").read_text())
    assert run_json["config"]["optim"]["betas"] == [0.9, 0.98] and run_json["config"]["optim"]["optimizer"] == "adamw"
    # a finished run, rerun: nothing trains, the final state is loaded into the fresh model
    again_model, again, _ = run(setting, state_dir=tmp_path)
    assert again.resumed_from == 9 and list(again) == list(ref_result) and same_weights(again_model, ref_model)
    assert not tmp_path.exists()  # without keep_state the finished run's state is deleted


def test_resume_refuses_other_arguments(setting, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(setting, state_dir=tmp_path, kill=3)
    with pytest.raises(ConfigError, match="different arguments.*seed"):
        run(setting, state_dir=tmp_path, seed=1)


def test_same_seed_same_numbers_other_seed_other_numbers(setting):
    _, a, ta = run(setting, seed=0, steps=4)
    _, b, tb = run(setting, seed=0, steps=4)
    _, c, _ = run(setting, seed=1, steps=4)
    assert list(a) == list(b) and ta.records == tb.records
    assert list(a) != list(c)


def test_old_call_still_works():
    torch.manual_seed(0)
    model = make_native(n_layers=L, d_model=D, d_vocab=V, seed=0)
    seen = []
    losses = finetune(model, Data(), 3, optim=OptimConfig(lr=1e-2), callbacks=[lambda s, m: seen.append((s, m.training))],
                      callback_steps=[0, 2])  # fmt: skip
    assert isinstance(losses, list) and isinstance(losses, FinetuneResult) and len(losses) == 3
    assert all(isinstance(x, float) for x in losses) and losses.evals == [] and losses.records == []
    assert seen == [(0, True), (2, True)] and model.training
    # the same numbers as a hand-written AdamW loop
    manual = make_native(n_layers=L, d_model=D, d_vocab=V, seed=0)
    opt = torch.optim.AdamW(manual.parameters(), lr=1e-2, betas=(0.9, 0.98), weight_decay=0.01)
    expected = []
    for step in range(3):
        loss = lm_loss(manual, Data().batch(step))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(manual.parameters(), 1.0)
        opt.step()
        expected.append(float(loss.detach()))
    assert list(losses) == expected and same_weights(model, manual)


def test_attached_interventions_are_used_and_paused_for_callbacks(setting):
    _probes, _ref, _base, v = setting
    model = make_native(n_layers=L, d_model=D, d_vocab=V, seed=0)
    writes = residual_write_params(model)
    W0 = [p.detach().clone() for _, _, p, _ in writes]
    states = []

    def cb(step, m):
        states.append([iv._paused > 0 for iv in active_interventions(m)])

    with block(model, v, "update") as iv:
        finetune(model, Data(), 4, optim=OptimConfig(lr=1e-2), callbacks=[cb], callback_steps=[2], progress=False)
        assert iv.attached  # the loop used it but did not remove it
    assert states == [[True]]
    for (label, layer, p, axis), w0 in zip(writes, W0):
        assert torch.tensordot(v[layer], p.detach() - w0, dims=([0], [axis])).abs().max() < 1e-6, label


def test_nonfinite_loss_names_the_step():
    model = make_native(n_layers=L, d_model=D, d_vocab=V, seed=0)

    def bad_loss(m, batch):
        loss = lm_loss(m, batch)
        return loss * float("nan") if bad_loss.calls == 2 else loss

    def counting(m, batch):
        bad_loss.calls += 1
        return bad_loss(m, batch)

    bad_loss.calls = 0
    with pytest.raises(NonFiniteError, match="step 2"):
        finetune(model, Data(), 4, loss_fn=counting, progress=False)


def test_tracking_steps_and_eval_mode():
    assert tracking_steps(100) == (0, 1, 2, 5, 10, 20, 50, 100)
    assert tracking_steps(30) == (0, 1, 2, 5, 10, 20, 30)
    model = make_native(n_layers=L, d_model=D, d_vocab=V, seed=0)
    model.train()
    model.blocks[1].eval()  # a mixed state must come back exactly
    before = [m.training for m in model.modules()]
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == before


def test_tied_gpt2_checkpoints_and_resumes(tmp_path):
    from hf_fixtures import save_tiny_gpt2
    from transformer_lens import TransformerBridge

    folder = str(save_tiny_gpt2(tmp_path / "g", n_layers=2))

    def go(state_dir, kill=None):
        torch.manual_seed(0)
        model = TransformerBridge.boot_transformers(folder, device="cpu")
        data = Data(vocab=int(model.cfg.d_vocab))
        kw = dict(optim=OptimConfig(lr=1e-2), callbacks=[Killer(kill)], callback_steps=[2], seed=0, progress=False)
        result = finetune(model, data, 3, state_dir=state_dir, **kw)
        return model, result

    ref_model, ref = go(None)
    with pytest.raises(KeyboardInterrupt):
        go(tmp_path / "s", kill=2)  # GPT-2 ties embed and unembed: the checkpoint must store both
    model, result = go(tmp_path / "s")
    assert list(result) == list(ref) and same_weights(model, ref_model)
    assert model.embed.original_component.weight is model.unembed.original_component.weight  # still tied
    # eval_mode reaches the Hugging Face modules the bridge keeps outside its module tree, and restores them
    dropouts = [m for m in model.original_model.modules() if isinstance(m, torch.nn.Dropout)]
    model.train()
    assert dropouts and all(m.training for m in dropouts)
    with eval_mode(model):
        assert not any(m.training for m in dropouts)
    assert all(m.training for m in dropouts)
