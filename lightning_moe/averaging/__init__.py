"""Gossip averaging of the dense (non-expert) parameters of the trainers of one run.

``SwarmAveraging`` is the Lightning callback; ``Averager`` the machinery (DHT declarations, the
exchanges, the server that answers peers and joiners); ``state`` the message and its checks.
"""
from .averager import Averager, run_key
from .callback import SwarmAveraging
from .state import Layout, RefusedState

__all__ = ["Averager", "Layout", "RefusedState", "SwarmAveraging", "run_key"]
