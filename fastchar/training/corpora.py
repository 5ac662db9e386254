"""The training corpus: the default one (Python's stdlib sources) or a file."""

from __future__ import annotations

from fastchar import data as fdata


def load_corpus(data: str | None) -> tuple[str, dict]:
    if data is None:
        return fdata.default_corpus()
    text = fdata.load_text(data)
    return text, fdata.file_manifest(data, text)


def describe_data(manifest: dict) -> str:
    digest = manifest["sha256"][:12]
    if manifest["source"] == "file":
        return f"{manifest['path']}: {manifest['chars']:,} chars, sha256 {digest}"
    return (
        f"Python {manifest['python']} stdlib sources: {len(manifest['files'])} files, "
        f"{manifest['chars']:,} chars, sha256 {digest}"
    )
