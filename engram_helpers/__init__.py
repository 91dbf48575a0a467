"""engram_helpers: the tested library behind the course "In Search of the Engram".

Modules: ``models`` (loading, architectures, predictions), ``hooks`` (read and patch module outputs),
``data`` (the facts dataset), ``tracing`` (causal tracing), ``rome`` (rank-one model editing),
``grafting`` (skill localization), ``forgetting``, ``plots``, ``checks`` (exercise checks).
"""

from .models import DEFAULT_MODEL, load_model

__all__ = ["DEFAULT_MODEL", "load_model"]
__version__ = "0.1.0"
