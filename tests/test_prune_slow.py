"""End to end on the real default model (SmolLM2-135M): BESA on a few blocks keeps perplexity
finite and below the magnitude baseline pruned on the same blocks."""

import copy
import math

import pytest


@pytest.mark.slow
def test_besa_on_smollm2_blocks_beats_magnitude():
    import besa_rs
    from besa_rs.data import calibration_set, load_text
    from besa_rs.evaluate import evaluate_perplexity
    from besa_rs.models import load_model, load_tokenizer
    from besa_rs.pruning import PruneConfig

    tok = load_tokenizer("smollm2-135m")
    dense = load_model("smollm2-135m")
    calib = calibration_set(tok, ["sotu"], 8, 256, seed=0)
    test = load_text("sotu-test")
    blocks = dict(first_block=0, num_blocks=3, progress=False)

    def ppl(model):
        return evaluate_perplexity(model, tok, test, seqlen=256, max_windows=4, progress=False)[
            "perplexity"
        ]

    base = ppl(dense)
    mag = copy.deepcopy(dense)
    besa_rs.prune(mag, calib, PruneConfig(method="magnitude", **blocks))
    rep = besa_rs.prune(dense, calib, PruneConfig(method="besa", **blocks))
    assert len(rep["blocks"]) == 3
    for b in rep["blocks"]:
        assert abs(b["realised_sparsity"] - 0.5) < 0.005
    p_besa, p_mag = ppl(dense), ppl(mag)
    assert math.isfinite(p_besa)
    assert base < p_besa < p_mag
    w = dense.model.layers[0].mlp.down_proj.weight
    assert 0.3 < (w == 0).float().mean().item() < 0.7
    # blocks after the pruned ones stay as they were (the GGUF-dequantised weights hold a few zeros)
    assert (dense.model.layers[5].mlp.down_proj.weight == 0).float().mean().item() < 0.1
