"""ZImageDiT's Omni path against diffusers' ZImageTransformer2DModel in omni mode (nested lists, ``siglip_feats``,
``image_noise_mask``) on a tiny Omni config with random weights: references are clean (t = 1), the target noisy,
captions split as diffusers' omni prompt template splits them (one segment per reference, then the target's two).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import ZImageTransformer2DModel

from ds_models_z_image import ZImageDiT, ZImageDiTConfig

pytestmark = pytest.mark.usefixtures("one_thread")

OMNI = dataclasses.replace(ZImageDiTConfig.tiny(), siglip_feat_dim=24)


@pytest.fixture(scope="module")
def models() -> tuple[ZImageTransformer2DModel, ZImageDiT]:
    c = OMNI
    torch.manual_seed(0)
    reference = ZImageTransformer2DModel(
        all_patch_size=(c.patch_size,),
        all_f_patch_size=(c.f_patch_size,),
        in_channels=c.in_channels,
        dim=c.dim,
        n_layers=c.n_layers,
        n_refiner_layers=c.n_refiner_layers,
        n_heads=c.n_heads,
        n_kv_heads=c.n_heads,
        norm_eps=c.norm_eps,
        qk_norm=True,
        cap_feat_dim=c.cap_feat_dim,
        siglip_feat_dim=c.siglip_feat_dim,
        rope_theta=c.rope_theta,
        t_scale=c.t_scale,
        axes_dims=list(c.axes_dims),
        axes_lens=list(c.axes_lens),
    ).eval()
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if "norm" in name and name.endswith("weight"):
                parameter.copy_(1 + 0.2 * torch.randn_like(parameter))
            else:
                parameter.normal_(0, 0.15)
    ours = ZImageDiT(OMNI).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def _case(seed: int, ref_sizes: list[tuple[int, int]], segment_lengths: list[int], with_siglip: bool):
    g = torch.Generator().manual_seed(seed)
    c = OMNI
    refs = [torch.randn(c.in_channels, h, w, generator=g) for h, w in ref_sizes]
    segments = [torch.randn(n, c.cap_feat_dim, generator=g) for n in segment_lengths]
    sigs = None
    if with_siglip and refs:
        # SigLIP2 grids of another resolution than the latents (their positions are stretched onto the latents)
        sigs = [torch.randn(h // 2 + 1, w // 2 + 3, c.siglip_feat_dim, generator=g) for h, w in ref_sizes]
    return refs, segments, sigs


def _diffusers(reference, target, t, samples):
    x = [[ref[:, None] for ref in refs] + [target[i][:, None]] for i, (refs, _, _) in enumerate(samples)]
    caps = [segments for _, segments, _ in samples]
    sig = [None if sigs is None else [*sigs, None] for _, _, sigs in samples]
    mask = [[0] * len(refs) + [1] for refs, _, _ in samples]
    out = reference(x, t, caps, siglip_feats=sig, image_noise_mask=mask, return_dict=False)[0]
    return torch.stack([o[:, 0] for o in out])


CASES = {
    "one-reference": [([(8, 12)], [5, 40, 7], True)],
    "two-references": [([(8, 12), (12, 8)], [3, 33, 20, 4], True)],
    "no-siglip": [([(8, 8)], [9, 10, 2], False)],
    "text-only": [([], [17], False)],
}


@pytest.mark.parametrize("name", list(CASES))
def test_omni_matches_diffusers(models, name):
    reference, ours = models
    samples = [_case(10 + k, *spec) for k, spec in enumerate(CASES[name])]
    target = torch.randn(len(samples), OMNI.in_channels, 8, 12, generator=torch.Generator().manual_seed(1))
    t = torch.full((len(samples),), 0.3)
    with torch.no_grad():
        expected = _diffusers(reference, target, t, samples)
        got = ours(
            target,
            t,
            [segments for _, segments, _ in samples],
            reference_latents=[refs for refs, _, _ in samples],
            siglip_features=[sigs for _, _, sigs in samples],
        )
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_omni_batch_of_different_samples_matches_diffusers(models):
    """Samples with different references and caption lengths in one batch (diffusers masks its batch padding)."""
    reference, ours = models
    samples = [_case(20, [(8, 12)], [5, 40, 7], True), _case(21, [(8, 8), (4, 12)], [3, 3, 50, 4], True)]
    target = torch.randn(2, OMNI.in_channels, 8, 12, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        expected = _diffusers(reference, target, t, samples)
        got = ours(
            target,
            t,
            [segments for _, segments, _ in samples],
            reference_latents=[refs for refs, _, _ in samples],
            siglip_features=[sigs for _, _, sigs in samples],
        )
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_clean_references_are_modulated_at_t_one(models):
    """The references' tokens take the t = 1 modulation: changing the target's t changes the prediction, and a
    reference's influence is not that of a noisy copy (a mask of all-noisy would differ)."""
    _, ours = models
    refs, segments, sigs = _case(30, [(8, 12)], [5, 40, 7], True)
    target = torch.randn(1, OMNI.in_channels, 8, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = ours(target, torch.tensor([0.2]), [segments], reference_latents=[refs], siglip_features=[sigs])
        b = ours(target, torch.tensor([0.9]), [segments], reference_latents=[refs], siglip_features=[sigs])
    assert not torch.allclose(a, b)


def test_omni_errors(models):
    _, ours = models
    refs, segments, sigs = _case(40, [(8, 12)], [5, 40, 7], True)
    target = torch.randn(1, OMNI.in_channels, 8, 12)
    t = torch.tensor([0.5])
    with pytest.raises(ValueError, match="caption segments"):
        ours(target, t, [segments[:1]], reference_latents=[refs], siglip_features=[sigs])
    with pytest.raises(ValueError, match="one grid per reference"):
        ours(target, t, [segments], reference_latents=[refs], siglip_features=[[*sigs, *sigs]])
    plain = ZImageDiT(ZImageDiTConfig.tiny())
    with pytest.raises(ValueError, match="siglip_feat_dim"):
        plain(target, t, [segments], reference_latents=[refs], siglip_features=[sigs])
