"""Widgets of the chat app."""

from .chat_log import AssistantTurn, ChatLog, UserTurn
from .prompt_input import PromptInput
from .side_panel import Meter, SidePanel

__all__ = ["AssistantTurn", "ChatLog", "Meter", "PromptInput", "SidePanel", "UserTurn"]
