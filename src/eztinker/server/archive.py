"""A checkpoint's PEFT adapter as a tar download, shared by the REST and Tinker routes.

Only the adapter's files go out (`peft.PeftModel.from_pretrained` loads the unpacked folder); the
optimizer and training state stay on the server.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from fastapi.responses import Response

from .service import ServiceError

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
# An empty member that Tinker's archives end with: SDKs 0.25-0.34 refuse an archive without it.
COMPLETE_MARKER = "checkpoint_complete"


def adapter_archive(directory: Path, ref: str) -> Response:
    """The adapter of checkpoint `ref` ('<run_id>/<name>', already owned by the caller) in
    `directory`, as an attachment named after the reference."""
    buffer = io.BytesIO()
    try:
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for name in ADAPTER_FILES:
                tar.add(directory / name, arcname=name)
            tar.addfile(tarfile.TarInfo(COMPLETE_MARKER), io.BytesIO(b""))
    except FileNotFoundError:  # deleted (or replaced by hand) since its ownership was checked
        raise ServiceError(404, f"checkpoint {ref} is listed but its files are gone") from None
    filename = ref.replace(":", "-").replace("/", "-") + ".tar"
    return Response(
        buffer.getvalue(),
        media_type="application/x-tar",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )
