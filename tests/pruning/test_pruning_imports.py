"""es_jax.pruning imports and runs with jax and numpy alone: every other package looks absent."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

# jax's own hard imports (jaxlib, ml_dtypes, opt_einsum). scipy is a requirement of jax that
# `import jax` and these transforms never load, so it is refused like every other package.
ALLOWED = ("es_jax", "jax", "jaxlib", "numpy", "ml_dtypes", "opt_einsum")

SCRIPT = textwrap.dedent(
    '''
    import importlib.machinery
    import sys

    ALLOWED = set(sys.argv[1:])
    BUILT_IN = (importlib.machinery.BuiltinImporter, importlib.machinery.FrozenImporter)
    refused = set()


    def allowed(name):
        """Whether a module may be found: the standard library, or a package of ALLOWED."""
        top = name.partition(".")[0]
        # sysconfig's build data, `_sysconfigdata_<abi>_<platform>`, is standard library too.
        return top in ALLOWED or top in sys.stdlib_module_names or top.startswith("_sysconfigdata_")


    class OnlyAllowed:
        """Finds through `finder` only the allowed modules; the others look uninstalled.

        For a refused module `import` raises ModuleNotFoundError and `importlib.util.find_spec`
        returns None, exactly as when its package is not installed.
        """

        def __init__(self, finder):
            self.finder = finder

        def find_spec(self, name, path=None, target=None):
            if allowed(name):
                return self.finder.find_spec(name, path, target)
            refused.add(name.partition(".")[0])
            return None

        def invalidate_caches(self):
            getattr(self.finder, "invalidate_caches", lambda: None)()


    sys.meta_path[:] = [f if f in BUILT_IN else OnlyAllowed(f) for f in sys.meta_path]

    import numpy as np

    from es_jax import pruning

    params = {
        "dense": {"kernel": np.arange(-6.0, 6.0, dtype=np.float32).reshape(3, 4),
                  "bias": np.ones(4, np.float32)},
    }
    pruned, mask = pruning.omp(params, 0.5)
    assert int((np.asarray(pruned["dense"]["kernel"]) == 0).sum()) == 6
    assert mask["dense"]["bias"] is None
    print("refused:", " ".join(sorted(refused)))
    '''
)


def test_pruning_imports_and_runs_with_only_jax_and_numpy():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, *ALLOWED],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[2],
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("refused:")
