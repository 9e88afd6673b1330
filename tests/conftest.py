"""Session-wide test settings.

Property tests (hypothesis) run derandomized under ``scripts/test.sh`` and in CI
(``SGDLAB_DERANDOMIZE=1`` or ``CI`` set): every run draws the same examples, so a result is
reproducible from the commit alone. Run ``pytest`` directly to let hypothesis explore new
examples (and keep a failing one in its local database).
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("reproducible", derandomize=True, database=None, print_blob=True)
if os.environ.get("SGDLAB_DERANDOMIZE") or os.environ.get("CI"):
    settings.load_profile("reproducible")
