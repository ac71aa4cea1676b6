"""Pieces shared by the taskmanager (`tasks/`), the guest agent (`guest/`) and `workflows/`."""

__version__ = "0.1.0"
