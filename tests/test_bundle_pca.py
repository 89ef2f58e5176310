"""cbir.pca: the projection fitted at build time and applied to every vector entering the index."""

from __future__ import annotations

import numpy as np
import pytest

from cbir.pca import Pca, fit_pca


def anisotropic(n: int = 2000, d: int = 16, seed: int = 0) -> np.ndarray:
    """Data whose variance falls off steeply by axis, rotated, and shifted off the origin."""
    rng = np.random.default_rng(seed)
    scales = 2.0 ** -np.arange(d)
    rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return ((rng.normal(size=(n, d)) * scales) @ rotation.T + 5.0).astype(np.float32)


def test_components_match_an_svd_of_the_centred_data():
    """The fitted axes span the same subspace as the top right-singular vectors, in the same order."""
    x = anisotropic()
    pca = fit_pca(x, 4)
    centred = x.astype(np.float64) - x.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(pca.mean, x.mean(axis=0), rtol=1e-5)
    for axis in range(4):
        assert abs(float(pca.components[axis] @ vt[axis])) == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_allclose(pca.eigenvalues, singular[:4] ** 2 / (len(x) - 1), rtol=1e-4)


@pytest.mark.parametrize("whiten", [False, True])
def test_transform_projects_and_l2_normalises(whiten):
    """Output has the PCA dimension, unit length, and is the normalised centred (whitened) projection."""
    x = anisotropic()
    pca = fit_pca(x, 5, whiten=whiten)
    out = pca.transform(x)
    assert out.shape == (len(x), 5) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    factors = 1 / np.sqrt(pca.eigenvalues + pca.eps) if whiten else np.ones(5)
    raw = ((x - pca.mean) @ pca.components.T.astype(np.float64)) * factors
    np.testing.assert_allclose(out, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(pca.transform(x[3]), out[3], atol=1e-6)  # one vector works too


def test_whitening_equalises_the_component_variances():
    """Whitened components have unit variance before normalisation; without whitening they keep the decay."""
    x = anisotropic()
    plain, white = fit_pca(x, 4), fit_pca(x, 4, whiten=True)
    centred = x - plain.mean
    plain_var = ((centred @ plain.components.T) * plain.scale).var(axis=0)
    white_var = ((centred @ white.components.T) * white.scale).var(axis=0)
    assert plain_var[0] / plain_var[3] > 50
    np.testing.assert_allclose(white_var, 1.0, rtol=1e-2)


def test_save_and_load_round_trip(tmp_path):
    """pca.npz reloads to a projection giving identical output."""
    x = anisotropic()
    pca = fit_pca(x, 6, whiten=True)
    pca.save(tmp_path / "pca.npz")
    loaded = Pca.load(tmp_path / "pca.npz")
    assert (loaded.dimension, loaded.input_dimension, loaded.whiten) == (6, 16, True)
    np.testing.assert_array_equal(loaded.transform(x), pca.transform(x))


def test_load_rejects_other_files(tmp_path):
    """A file that is not a PCA file: ValueError, not a crash later."""
    np.savez(tmp_path / "other.npz", something=np.zeros(3))
    with pytest.raises(ValueError, match="not a cbir PCA file"):
        Pca.load(tmp_path / "other.npz")


@pytest.mark.parametrize("dimension,message", [(0, "between 1 and 15"), (16, "between 1 and 15"), (11, "larger than")])
def test_fit_rejects_impossible_dimensions(dimension, message):
    """Asking for no axes, as many axes as inputs, or more axes than vectors is refused."""
    with pytest.raises(ValueError, match=message):
        fit_pca(anisotropic(n=10), dimension)


def test_transform_rejects_the_wrong_input_dimension():
    """A vector of another length cannot be projected."""
    pca = fit_pca(anisotropic(), 3)
    with pytest.raises(ValueError, match="dimension 16"):
        pca.transform(np.zeros(15, np.float32))
