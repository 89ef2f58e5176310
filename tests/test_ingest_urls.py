"""Index builds from URL manifests (Open Images CSV) served by a local HTTP server.

The build downloads concurrently (at most `per host` at once), retries what may pass, gives up on
what cannot, and lists every failure with its reason in rejects.jsonl; failures that may pass are
not remembered, so a later `--incremental` run picks them up. The model is the quick stand-in of
test_ingest_resume (the download path is what is under test).
"""

from __future__ import annotations

import json

import pytest

from apps.ingest.build import BuildOptions, build_index
from test_ingest_resume import ColourEmbedding, bundle_contents
from test_reliability_urls import image_server, png  # noqa: F401 - the fixture

OPEN_IMAGES_HEADER = "ImageID,Subset,OriginalURL,OriginalLandingURL,License,AuthorProfileURL,Author,Title\n"


def open_images_csv(path, rows) -> None:
    """An Open Images style manifest: ImageID and OriginalURL among other columns."""
    with path.open("w") as f:
        f.write(OPEN_IMAGES_HEADER)
        for image_id, url in rows:
            f.write(f"{image_id},train,{url},https://example.org/{image_id},CC BY 2.0,,someone,{image_id} title\n")


def test_an_open_images_manifest_is_downloaded_with_limits_retries_and_rejects(tmp_path, image_server):
    """12 good images (held 0.2 s each, so downloads overlap), a flaky one (503 twice), a 404, a huge one,
    an HTML page, a trickling one and bytes that are not an image: the bundle holds the 13 that work with
    their metadata; rejects.jsonl gives the other 5 their reasons, the slow one marked transient; no more
    than per_host=3 downloads ran at once."""
    good = [(f"oi{i:02d}", image_server.url(f"/hold/{i}?t=0.2")) for i in range(12)]
    bad = [
        ("flaky", image_server.url("/flaky.png")),
        ("missing", image_server.url("/status/404")),
        ("huge", image_server.url("/huge-declared")),
        ("page", image_server.url("/html")),
        ("slow", image_server.url("/trickle")),
        ("text", image_server.url("/img/notes.png")),
    ]
    manifest = tmp_path / "openimages.csv"
    open_images_csv(manifest, good + bad)
    options = BuildOptions(batch_size=4, trees=3, progress=False, fetch_workers=8, fetch_per_host=3,
                           fetch_timeout_s=1.5, fetch_retries=2, max_image_bytes=1_000_000)
    result = build_index(manifest, tmp_path / "bundle", ColourEmbedding(), options)

    ids, _ = bundle_contents(tmp_path / "bundle")
    assert ids == [image_id for image_id, _ in good] + ["flaky"]
    assert image_server.hits["/flaky.png"] == 3  # two 503s, then the image
    assert 1 < image_server.max_held <= 3
    rejects = {r["item_id"]: r for r in map(json.loads, (tmp_path / "bundle" / "rejects.jsonl").read_text().splitlines())}
    assert set(rejects) == {"missing", "huge", "page", "slow", "text"}
    assert "HTTP 404" in rejects["missing"]["reason"]
    assert "over the 1000000-byte limit" in rejects["huge"]["reason"]
    assert "text/html, not an image" in rejects["page"]["reason"]
    assert "took longer than 1.5 s" in rejects["slow"]["reason"] and rejects["slow"]["transient"] is True
    assert "not an image" in rejects["text"]["reason"]
    assert (result.items, result.rejected, result.transient) == (13, 5, 1)
    from cbir.bundle import open_bundle

    with open_bundle(tmp_path / "bundle") as bundle:
        (record,) = bundle.find_items(["oi03"])
    assert record.url == image_server.url("/hold/3?t=0.2")
    assert record.metadata["Author"] == "someone" and record.metadata["License"] == "CC BY 2.0"


def test_failures_that_may_pass_are_retried_by_the_next_incremental_build(tmp_path, image_server):
    """A 503 that outlasts the retries is reported, not remembered; when the host recovers, an --incremental
    run downloads only that image (and the 404 again: a finished build keeps no work shards) and adds it."""
    image_server.files["a.png"] = png((10, 200, 10))
    image_server.flaky_failures = 10
    manifest = tmp_path / "list.csv"
    open_images_csv(manifest, [("a", image_server.url("/img/a.png")), ("later", image_server.url("/flaky.png")),
                               ("gone", image_server.url("/status/404"))])
    options = BuildOptions(batch_size=4, trees=3, progress=False, fetch_retries=1, fetch_timeout_s=2)
    first = build_index(manifest, tmp_path / "bundle", ColourEmbedding(), options)
    assert bundle_contents(tmp_path / "bundle")[0] == ["a"] and first.transient == 1

    image_server.flaky_failures = 0
    image_server.hits.clear()
    model = ColourEmbedding()
    second = build_index(manifest, tmp_path / "bundle", model,
                         BuildOptions(**{**options.__dict__, "incremental": True}))
    assert bundle_contents(tmp_path / "bundle")[0] == ["a", "later"]
    assert sum(model.embedded) == 1 and image_server.hits["/img/a.png"] == 0
    assert image_server.hits["/status/404"] == 1
    assert second.transient == 0


@pytest.mark.parametrize("private", [False, True])
def test_public_urls_only_refuses_the_manifests_private_addresses(tmp_path, image_server, private):
    """By default a manifest may name internal hosts (it is the operator's file); allow_private_urls=False
    (`--public-urls-only`) refuses them, into rejects.jsonl."""
    image_server.files["a.png"] = png()
    manifest = tmp_path / "list.csv"
    open_images_csv(manifest, [("a", image_server.url("/img/a.png")), ("b", image_server.url("/img/a.png?b"))])
    options = BuildOptions(trees=3, progress=False, allow_private_urls=private)
    if private:
        assert build_index(manifest, tmp_path / "bundle", ColourEmbedding(), options).items == 2
    else:
        with pytest.raises(Exception, match="none of the 2 images"):
            build_index(manifest, tmp_path / "bundle", ColourEmbedding(), options)
        assert "loopback address" in (tmp_path / "bundle" / "rejects.jsonl").read_text()
        assert sum(image_server.hits.values()) == 0
