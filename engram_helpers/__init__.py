"""engram_helpers: the tested library behind the course "In Search of the Engram".

Modules: ``models`` (loading, architectures, predictions), ``hooks`` (read and patch module outputs),
``data`` (the facts dataset), ``query`` (a prompt template, its subject and answer), ``textdata`` (text
corpora), ``weights`` (change weights and undo exactly), ``stats`` (means with bootstrap intervals),
``tracing`` (causal tracing), ``layer_stats`` (the key statistics C), ``rome`` (rank-one model editing),
``evaluation`` (scoring edits), ``sweeps`` (the committed layer sweeps and the layer rule), ``memit`` (many
edits at once), ``grafting`` (skill localization), ``forgetting``, ``toy_memory`` (a small associative
memory), ``widgets``, ``plots``, ``claims`` (asserted claims), ``glue`` (numbers for the book), ``checks``
(exercise checks).
"""

from .models import DEFAULT_MODEL, load_model

__all__ = ["DEFAULT_MODEL", "load_model"]
__version__ = "0.2.0.dev0"  # changes since 0.1.0: CHANGELOG.md
