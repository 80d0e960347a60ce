"""Screens of the chat app."""

from .chat import ChatScreen

__all__ = ["ChatScreen"]
