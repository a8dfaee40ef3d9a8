"""Atomic file writes: a kill mid-write leaves the old file or none, never a truncated one."""

import os


def write_bytes(path: str, data: bytes):
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_text(path: str, text: str):
    write_bytes(path, text.encode("utf-8"))
