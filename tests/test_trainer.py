import numpy as np
import pytest
import torch

from piarec.config import load_config
from piarec.errors import TrainingError
from piarec.evaluate.protocol import evaluate_model, evaluate_popularity
from piarec.models.baselines import train_popularity
from piarec.models.contract import SparseBatch
from piarec.models.multivae import MultiVAE
from piarec.train.trainer import LambdaSchedule, beta_at, train, train_step


def _cfg(model=None, **training):
    cfg = load_config(environ={}, overrides={
        "model": {"hidden_dim": 64, "latent_dim": 16, "flow_hidden": 32, **(model or {})},
        "training": {"epochs": 25, "batch_size": 100, "lr": 3e-3, "anneal_steps": 2000, "device": "cpu", **training},
        "pia": {"lambda_a": 0.1},
    })
    return cfg


def test_beta_grows_linearly_then_caps():
    assert beta_at(0, 0.2, 1000) == 0.0
    assert beta_at(100, 0.2, 1000) == pytest.approx(0.1)
    assert beta_at(5000, 0.2, 1000) == 0.2


def test_lambda_schedule_raises_after_patience_once_per_window_and_caps():
    s = LambdaSchedule(value=1.0, scale=2.0, patience=3, cap=5.0)
    seq = [True, False, False, False, False, False, False, True, False, False, False, False, False, False]
    raised = [s.update(i) for i in seq]
    # stalls 1,2,3 -> raise to 2; counter restarts: 4,5,6 -> raise to 4; 7 improves;
    # 8,9,10 -> raise, capped at 5; 11,12,13 stall again but the cap is reached
    assert raised == [False, False, False, True, False, False, True, False, False, False, True, False, False, False]
    assert s.value == 5.0
    assert not any(LambdaSchedule(0.0, 2.0, 1, 8.0).update(False) for _ in range(3))


def test_paper_schedule_raises_every_stalled_epoch_without_a_cap():
    s = LambdaSchedule(value=8.0, scale=2.0, patience=3, cap=8.0, mode="paper")
    raised = [s.update(imp) for imp in [True, False, False, False, False, False, True, False]]
    # best epoch 1; epochs 4, 5, 6 are 3, 4, 5 behind it: a raise each; improvement resets
    assert raised == [False, False, False, True, True, True, False, False]
    assert s.value == 64.0 and s.stall == 1  # past the patience mode's cap of 8
    patience = LambdaSchedule(value=8.0, scale=2.0, patience=3, cap=8.0)
    assert not any(patience.update(False) for _ in range(9))  # capped at its start


def test_anneal_epochs_reach_the_cap_after_that_many_epochs_whatever_the_data_size(planted_snapshot):
    from piarec.train.trainer import anneal_steps

    cfg = load_config(environ={}, overrides={"training": {"anneal_epochs": 4, "beta_cap": 0.2}})
    assert anneal_steps(cfg.training, 8) == pytest.approx(160)  # beta = step / 160 reaches 0.2 at step 32
    assert anneal_steps(load_config(environ={}).training, 8) == 200_000
    cfg = load_config(environ={}, overrides={
        "model": {"hidden_dim": 32, "latent_dim": 8}, "diagnostics": {"enabled": False},
        "training": {"epochs": 5, "batch_size": 100, "anneal_epochs": 4, "beta_cap": 0.2, "device": "cpu"}})
    betas = [row["beta"] for row in train(cfg, planted_snapshot).history]
    per_epoch = -(-planted_snapshot.train.n_rows // 100)
    assert betas[:3] == pytest.approx([0.2 * (e + 1) / 4 for e in range(3)]) and betas[3:] == [0.2, 0.2]
    assert per_epoch == 8  # 800 training users


def test_mean_alignment_is_the_sum_over_latent_dimensions_divided_by_d(planted_snapshot):
    """alignment: mean trains exactly as sum with lambda_A / latent_dim."""
    base = {"model": {"hidden_dim": 32, "latent_dim": 8}, "diagnostics": {"enabled": False},
            "training": {"epochs": 2, "batch_size": 100, "device": "cpu"}}
    mean = load_config(environ={}, overrides={**base, "pia": {"lambda_a": 4.0, "alignment": "mean"}})
    scaled = load_config(environ={}, overrides={**base, "pia": {"lambda_a": 0.5, "alignment": "sum"}})
    a, b = train(mean, planted_snapshot), train(scaled, planted_snapshot)
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    assert [r["lambda_a"] for r in a.history] == [4.0, 4.0]  # the logged lambda_A is the configured one


def test_planted_structure_is_recovered(planted_snapshot):
    result = train(_cfg(), planted_snapshot)
    model = evaluate_model(result.model, planted_snapshot.test)
    pop = evaluate_popularity(train_popularity(planted_snapshot.train), planted_snapshot.test)
    # Held-out items share the fold-in items' block: a model that learned the blocks ranks
    # them in its top 20; popularity cannot (the blocks are equally popular).
    assert model["recall_at_20"] >= 0.8
    assert model["recall_at_20"] >= 3 * pop["recall_at_20"]
    assert result.best_epoch >= 1 and result.best_metrics["ndcg_at_100"] > 0
    losses = [r["nll"] for r in result.history]
    assert losses[-1] < losses[0]


def test_resume_from_checkpoint_is_bit_exact(planted_snapshot, tmp_path):
    straight = train(_cfg(epochs=4), planted_snapshot)
    ck = str(tmp_path / "ck.pt")
    train(_cfg(epochs=2), planted_snapshot, checkpoint_path=ck)
    resumed = train(_cfg(epochs=4), planted_snapshot, checkpoint_path=ck)
    assert resumed.best_epoch == straight.best_epoch
    for (k, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history]


def test_nan_loss_stops_training(planted_snapshot):
    cfg = _cfg()
    model = MultiVAE(planted_snapshot.train.n_cols, cfg.model)
    with torch.no_grad():
        model.decoder[-1].weight.fill_(float("nan"))
    opt = torch.optim.Adam(model.parameters())
    batch = SparseBatch.from_csr(planted_snapshot.train.take_rows(np.arange(10)))
    with pytest.raises(TrainingError, match="loss became nan"):
        train_step(model, opt, batch, beta=0.1, lambda_a=0.1)


@pytest.mark.parametrize("model, epochs", [({"encoder": "iaf"}, 25), ({"backbone": "recvae"}, 8)], ids=["iaf", "recvae"])
def test_planted_structure_is_recovered_by_iaf_and_recvae(planted_snapshot, model, epochs):
    result = train(_cfg(model, epochs=epochs), planted_snapshot)
    metrics = evaluate_model(result.model, planted_snapshot.test)
    assert metrics["recall_at_20"] >= 0.8, metrics
    assert result.history[-1]["nll"] < result.history[0]["nll"]
    assert result.history[0]["align"] > 0  # PIA was on


def test_resume_is_bit_exact_for_recvae_alternating_updates(planted_snapshot, tmp_path):
    cfg = lambda n: _cfg({"backbone": "recvae", "recvae_encoder_passes": 2}, epochs=n)  # noqa: E731
    straight = train(cfg(3), planted_snapshot)
    ck = str(tmp_path / "ck.pt")
    train(cfg(1), planted_snapshot, checkpoint_path=ck)
    resumed = train(cfg(3), planted_snapshot, checkpoint_path=ck)
    for (k, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history]
    assert straight.history[0]["step"] == 3 * 8  # (2 encoder + 1 decoder passes) x 8 batches


def test_recvae_encoder_phase_leaves_the_decoder_alone(planted_snapshot):
    from piarec.models.factory import build_model
    from piarec.train.trainer import _only_trainable

    cfg = _cfg({"backbone": "recvae"})
    model = build_model(planted_snapshot.train.n_cols, cfg.model)
    groups = model.param_groups()
    opt = torch.optim.Adam(groups["encoder"])
    before = model.decoder.weight.detach().clone()
    _only_trainable(groups, "encoder")
    batch = SparseBatch.from_csr(planted_snapshot.train.take_rows(np.arange(50)))
    train_step(model, opt, batch, beta=0.0, lambda_a=0.1, phase=model.phases()[0])
    assert torch.equal(model.decoder.weight, before) and model.decoder.weight.grad is None


def test_early_stopping_ends_a_stalled_run_and_says_why(planted_snapshot):
    result = train(_cfg(epochs=200, early_stop_patience=6), planted_snapshot)
    # the planted groups are learnt in a few epochs; six epochs later without a better one, it stops
    assert result.stop_reason == "early_stop"
    assert len(result.history) == result.best_epoch + 6 < 200
    assert train(_cfg(epochs=3), planted_snapshot).stop_reason == "epochs"


def test_bf16_autocast_learns_as_fp32_and_keeps_the_loss_in_fp32(planted_snapshot):
    fp32 = train(_cfg(epochs=8), planted_snapshot)
    bf16 = train(_cfg(epochs=8, precision="bf16"), planted_snapshot)
    assert bf16.best_metrics["ndcg_at_100"] == pytest.approx(fp32.best_metrics["ndcg_at_100"], abs=0.03)
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # weights stay fp32
    model = MultiVAE(planted_snapshot.n_items, _cfg().model)
    batch = SparseBatch.from_csr(planted_snapshot.train.take_rows(np.arange(50)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.logits(torch.zeros(2, 16)).dtype == torch.bfloat16  # the layers do run in bf16
        parts = model.loss(batch, 0.2, 0.1)
    assert {parts.total.dtype, parts.nll.dtype, parts.kl.dtype, parts.align.dtype} == {torch.float32}


def test_picked_beta_is_the_beta_of_the_first_best_validation_epoch():
    from piarec.train.trainer import picked_beta

    history = [{"epoch": e, "beta": 0.1 * e, "val_ndcg_at_100": v} for e, v in enumerate([0.2, 0.5, 0.4, 0.5], 1)]
    assert picked_beta(history) == (pytest.approx(0.2), 2)


def test_beta_search_trains_again_at_the_beta_of_the_searchs_best_epoch(planted_snapshot, tmp_path):
    """Liang et al.'s procedure: a search run anneals beta towards 1 (reaching it after
    anneal_epochs), then the returned run equals a plain run at that cap and the search's rate."""
    from piarec.train.trainer import picked_beta

    base = {"model": {"hidden_dim": 32, "latent_dim": 8}, "diagnostics": {"enabled": False}, "pia": {"lambda_a": 0.1}}
    # beta reaches 1 after 40 epochs; on this data validation peaks before the 8th, so the
    # final run's cap binds in its last epoch(s).
    training = {"epochs": 8, "batch_size": 100, "lr": 0.01, "device": "cpu", "early_stop_patience": None,
                "anneal_epochs": 40}
    cfg = load_config(environ={}, overrides={**base, "training": {**training, "beta_search": True}})
    seen: list[dict] = []
    ck = str(tmp_path / "ck.pt")
    result = train(cfg, planted_snapshot, checkpoint_path=ck, on_search_epoch=seen.append)

    search = result.beta_search
    per_epoch = -(-planted_snapshot.train.n_rows // 100)
    assert search["anneal_steps"] == 40 * per_epoch
    assert [r["beta"] for r in seen] == pytest.approx([(e + 1) / 40 for e in range(8)])
    assert seen == search["history"] and (search["beta"], search["epoch"]) == picked_beta(seen)
    assert search["epoch"] < 8  # the pick is not simply the last epoch's beta
    assert [r["beta"] for r in result.history] == pytest.approx([min(search["beta"], (e + 1) / 40) for e in range(8)])

    plain = load_config(environ={}, overrides={**base, "training": {
        **training, "anneal_epochs": None, "anneal_steps": 40 * per_epoch, "beta_cap": search["beta"]}})
    want = train(plain, planted_snapshot)
    for k, v in want.model.state_dict().items():
        assert torch.equal(v, result.model.state_dict()[k]), k

    # Both runs checkpoint; a rerun resumes them instead of training again.
    import os
    assert os.path.exists(ck) and os.path.exists(ck + ".beta-search")
    again = train(cfg, planted_snapshot, checkpoint_path=ck)
    assert again.beta_search["beta"] == search["beta"]
    assert [r["train_seconds"] for r in again.history] == [r["train_seconds"] for r in result.history]
