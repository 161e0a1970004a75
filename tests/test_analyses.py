"""Each analysis of a trial's interpretation on its own, and `compute`'s skip branches, on a tiny real
trial (width 0.125, three epochs on the generated 10-class images, 100 test images) and on a copy of it
whose head was made to collapse (every test image gets the same feature vector and the same logits)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vgg_xai import analyses, checkpoint, features
from vgg_xai.config import TrialConfig
from vgg_xai.data import DeviceSplit, load_cache
from vgg_xai.model import build_model
from vgg_xai.postprocess import Settings, compute
from vgg_xai.results import INTERPRET_COLUMNS, SUMMARY_KEYS
from vgg_xai.train import evaluate, run_trial

# Small enough for 100 test images: fewer PCA dimensions, BIC candidates and scored images.
SMALL = Settings(pca_dim=10, bic_ks=(2, 5, 10), bic_types=("full", "diag"), perplexity=10, faithfulness_per_class=1,
                 sanity_per_class=1, sanity_draws=1, faithfulness_steps=4, bn_batch=32)


def _config(cache: Path, **over) -> TrialConfig:
    return TrialConfig(**{**dict(data=str(cache), variant="bn", width=0.125, epochs=1, batch_size=32,
                                 precision="fp32", device="cpu"), **over})


@pytest.fixture(scope="module")
def trial(tmp_path_factory, tiny_cache) -> Path:
    out = tmp_path_factory.mktemp("analyses") / "bn-lr1e-3-s0"
    run_trial(_config(tiny_cache, epochs=3), out)  # one epoch predicts one class for every test image
    return out


@pytest.fixture(scope="module")
def collapsed(trial, tmp_path_factory, tiny_cache) -> Path:
    """The trial with its head's last layer zeroed (as a dead ReLU layer would be) and the feature dump of
    that model: every feature vector is 0 and every test image gets the classifier's bias as logits."""
    out = tmp_path_factory.mktemp("collapsed") / "bn-lr1e-3-s0"
    shutil.copytree(trial, out)
    saved = checkpoint.load(out / "checkpoint.pt")
    for name in ("head.fc2.weight", "head.fc2.bias"):
        saved["model"][name] = torch.zeros_like(saved["model"][name])
    checkpoint.save(saved, out / "checkpoint.pt")
    net = build_model(_config(tiny_cache))
    net.load_state_dict(saved["model"])
    prep = load_cache(tiny_cache)
    _, _, f, logits = evaluate(net, DeviceSplit(*prep.splits["test"], prep.mean, prep.std, "cpu"), 32, None, False)
    dump = features.read(out / "features.h5")
    features.write(out / "features.h5", dataclasses.replace(dump, features=f, logits=logits,
                                                             predictions=logits.argmax(1)))
    return out


@pytest.fixture(scope="module")
def inputs(trial) -> analyses.Inputs:
    return analyses.load_inputs(trial, SMALL, threads=1)


def test_inputs_hold_the_probe_images_and_the_dump(inputs):
    assert len(inputs.probes) == 10 and sorted(inputs.test_y[inputs.probes]) == list(range(10))
    assert inputs.probe_x.shape == (10, 3, 32, 32) and inputs.probe_predictions.shape == (10,)
    assert len(inputs.dump.labels) == 100 and not inputs.feature_findings
    assert len(inputs.balanced(3)) == 30 and len(inputs.balanced(1000)) == 100  # at most the smallest class


def test_filters_and_maps(inputs):
    r = analyses.filters_and_maps(inputs)
    first, last = r.arrays["filters"]["trained"]["first"], r.arrays["filters"]["init"]["last"]
    assert first.shape == (8, 3, 3, 3) and last.shape == (16, 16, 3, 3)  # width 0.125: 8 and 64 channels, 16 kept
    assert not np.array_equal(first, r.arrays["filters"]["init"]["first"])  # one epoch moved the weights
    fmaps = r.arrays["fmaps"]
    assert fmaps["trained"]["first"].shape[:2] == (10, 8) and fmaps["trained"]["last"].shape[:2] == (10, 16)
    assert fmaps["layers"][0] != fmaps["layers"][1] and r.arrays["through"]["layers"][0] == fmaps["layers"][0]
    assert r.skipped is None and not r.summary


def test_bn_histograms_only_with_batchnorm(inputs, tiny_cache):
    hist = analyses.bn_histograms(inputs).arrays["bn"]
    assert hist["layers"] and all(name in hist for name in hist["layers"])
    plain = build_model(_config(tiny_cache, variant="plain")).eval()
    assert analyses.bn_histograms(dataclasses.replace(inputs, trained=plain)).arrays == {}


def test_class_maps_of_every_method(inputs, tiny_cache):
    r = analyses.class_maps(inputs)
    assert r.details["methods"] == list(SMALL.cam_methods) and r.skipped is None and not r.findings
    assert all(r.arrays["cam"][m].shape == (10, 32, 32) for m in SMALL.cam_methods)
    assert set(r.checks) >= {f"cam_{m}_flat_maps" for m in SMALL.cam_methods}
    linear = build_model(_config(tiny_cache, head="linear")).eval()
    assert analyses.class_maps(dataclasses.replace(inputs, trained=linear)).details["methods"][-1] == "cam"


def test_class_maps_skipped_where_every_map_is_flat(inputs, tiny_cache):
    dead = build_model(_config(tiny_cache, variant="plain"))
    with torch.no_grad():
        for p in dead.features.parameters():
            p.zero_()  # every activation 0: no gradient, every map flat
    r = analyses.class_maps(dataclasses.replace(inputs, trained=dead.eval()))
    assert r.skipped.startswith("every method's maps of the probe images are degenerate")
    assert r.findings == [f"class activation maps of the probe images: {r.skipped.split('(', 1)[1][:-1]}"]
    assert "cam" in r.arrays  # the maps are kept: the figures say why they are not drawn


def test_deletion_insertion(inputs):
    r = analyses.deletion_insertion(inputs)
    assert r.skipped is None and list(r.summary) == SUMMARY_KEYS["faithfulness"]
    assert all(v is not None for v in r.summary.values()) and r.summary["faithfulness_n_images"] == 10
    curves = r.arrays["faithfulness"]
    assert curves["deletion"].shape == curves["insertion_random"].shape == (10, 5) and len(curves["x"]) == 5
    assert 0 <= r.summary["deletion_wins"] <= 1 and r.details["n_images"] == 10
    assert r.checks["faithfulness_maps"] == 10


def test_randomization(inputs):
    r = analyses.randomization(inputs)
    assert r.skipped is None and set(r.summary) == set(SUMMARY_KEYS["sanity"])
    assert r.summary["sanity_n_images"] == 10 and r.summary["sanity_n_draws"] == 1
    assert -1 <= r.summary["sanity_rho"] <= 1 and set(r.details) >= set(analyses.SANITY_DETAILS)
    assert r.arrays["sanity"]["image"].shape == (32, 32, 3) and r.checks["sanity_maps"] == 10


def test_tsne_and_mixture_from_one_pca(inputs):
    pcs = analyses.principal_components(inputs)
    assert pcs.z.shape == (100, 50) and pcs.why_not is None
    t = analyses.tsne(inputs, pcs)
    assert t.arrays["embedding"]["tsne"].shape == (100, 2) and t.details["n"] == 100
    g = analyses.mixture(inputs, pcs)
    assert g.skipped is None and list(g.summary) == SUMMARY_KEYS["gmm"]
    assert g.arrays["embedding"]["gmm"].shape == (100,) and g.arrays["bic"]["bic"].shape == (2, 3)
    assert g.details["pca_dim"] == 10 and g.checks["gmm_clusters_used"] >= 1


def test_mixture_skipped_with_fewer_vectors_than_components(inputs):
    few = dataclasses.replace(inputs, settings=dataclasses.replace(SMALL, bic_ks=(2, 200)))
    r = analyses.mixture(few, analyses.principal_components(few))
    assert r.skipped == "only 100 distinct feature vectors: too few for mixtures of up to 200 components"
    assert r.summary == {"ari": None, "nmi": None, "purity": None} and not r.arrays and r.details is None


def test_classification_stores_the_reliability_bins_of_its_ece(inputs):
    r = analyses.classification(inputs)
    bins = r.arrays["metrics"]["reliability"]
    assert bins["count"].sum() == 100 and len(bins["edges"]) == 16
    ok = bins["count"] > 0
    ece = float((bins["count"][ok] * np.abs(bins["accuracy"][ok] - bins["confidence"][ok])).sum() / 100)
    assert r.summary["ece"] == pytest.approx(ece, abs=1e-12)
    d = inputs.dump
    assert r.summary["test_acc"] == float((d.predictions == d.labels).mean())
    assert r.arrays["metrics"]["confusion"].sum() == 100 and list(r.details) == inputs.classes


def test_compute_of_a_learning_trial(trial):
    arrays, m = compute(trial, SMALL, threads=1)
    assert sorted(m["summary"]) == sorted(["test_acc", *INTERPRET_COLUMNS]) and not m["skipped"]
    assert all(v is not None for v in m["summary"].values())
    assert set(m["seconds"]) == {"load", "filters", "bn_histograms", "cam", "faithfulness", "sanity", "tsne", "gmm",
                                 "metrics"}
    assert set(arrays["embedding"]) == {"labels", "tsne", "gmm", "contingency"}
    assert "reliability" in arrays["metrics"] and m["degenerate"]["detected"] is False


def test_compute_skips_what_a_collapsed_trial_makes_meaningless(collapsed):
    arrays, m = compute(collapsed, SMALL, threads=1)
    found = m["degenerate"]["reasons"]
    assert m["degenerate"]["detected"] and found[0].startswith("every test image gets the same feature vector")
    assert any(r.startswith("one predicted class for all 100 test images") for r in found)
    same = "the model's output is the same for every test image"
    assert m["skipped"]["faithfulness"] == f"{same}: deleting or inserting pixels cannot change it"
    assert m["skipped"]["sanity"] == f"{same}: its maps carry no information about the image to randomize"
    assert m["skipped"]["tsne"] == f"{found[0]}: no neighbourhoods to embed"
    assert m["skipped"]["gmm"] == f"{found[0]}: nothing to cluster"
    for analysis in ("faithfulness", "sanity", "tsne", "gmm"):
        assert m[analysis] is None
    assert all(m["summary"][k] is None for k in INTERPRET_COLUMNS if k != "ece")
    assert arrays["embedding"] == {"labels": arrays["embedding"]["labels"]}
    assert not {"faithfulness", "sanity", "bic"} & set(arrays) and "reliability" in arrays["metrics"]


def test_the_report_table_shows_the_summary_values_and_no_other():
    from vgg_xai.report import INTERPRET_TABLE
    from vgg_xai.results import VERDICT_COLUMNS

    shown = {key for _, cols in INTERPRET_TABLE for _, key, _ in cols}
    spreads = {spread.removeprefix("of:") for _, cols in INTERPRET_TABLE for _, _, spread in cols if spread}
    assert shown | spreads <= set(INTERPRET_COLUMNS) | set(VERDICT_COLUMNS)
    # every value but the paired t-tests' p (the verdicts say what they mean) has its column
    assert set(INTERPRET_COLUMNS) - shown - spreads == {"deletion_vs_random_p", "insertion_vs_random_p"}
