"""What the commands of several users share."""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
