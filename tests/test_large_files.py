"""large_files.yml: model-zoo format, hashes that match the committed files, and MONAI's download path."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml
from monai.apps.utils import HashCheckError
from monai.bundle import download_large_files
from tests.conftest import ROOT

KEYS = {"path", "url", "hash_val", "hash_type"}


def digest(path: Path, hash_type: str) -> str:
    return hashlib.new(hash_type, path.read_bytes()).hexdigest()


def test_large_files_yml_is_in_model_zoo_format_and_hashes_match():
    entries = yaml.safe_load((ROOT / "large_files.yml").read_text())["large_files"]
    assert isinstance(entries, list)
    for entry in entries:
        assert set(entry) == KEYS, entry
        assert entry["url"].startswith("https://")
        assert digest(ROOT / entry["path"], entry["hash_type"]) == entry["hash_val"], entry["path"]
    committed = {str(p.relative_to(ROOT)) for p in (ROOT / "models").glob("*.pt")}
    assert committed == {e["path"] for e in entries}  # every shipped weight file is listed, and only those


def write_bundle(root: Path, source: Path, hash_val: str) -> None:
    entry = {"path": "models/weights.pt", "url": source.as_uri(), "hash_val": hash_val, "hash_type": "sha256"}
    (root / "large_files.yml").write_text(yaml.safe_dump({"large_files": [entry]}))


def test_download_large_files_fetches_and_checks_a_file_url(tmp_path):
    """MONAI's download path (``python -m monai.bundle download_large_files``) against a local ``file://`` URL:
    the file lands at its path; a wrong hash is refused. (``large_file_name=`` is not passed: it raises
    UnboundLocalError in MONAI 1.6.1.)"""
    source = tmp_path / "release" / "weights.pt"
    source.parent.mkdir()
    source.write_bytes(b"weights" * 1000)
    good = tmp_path / "bundle"
    good.mkdir()
    write_bundle(good, source, digest(source, "sha256"))
    download_large_files(bundle_path=str(good))
    assert (good / "models" / "weights.pt").read_bytes() == source.read_bytes()

    bad = tmp_path / "bad"
    bad.mkdir()
    write_bundle(bad, source, "0" * 64)
    with pytest.raises(HashCheckError, match="hash check"):
        download_large_files(bundle_path=str(bad))
