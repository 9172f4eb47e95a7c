"""The integrations stay optional: importing fused_pool (or the adapter module) imports none of
the libraries they adapt to. Runs whether or not those libraries are installed."""

import subprocess
import sys


def test_import_fused_pool_does_not_import_integration_libraries():
    script = ("import sys\n"
              "import fused_pool, fused_pool.integrations\n"
              "import fused_pool.integrations.sentence_transformers\n"
              "loaded = sorted({'sentence_transformers', 'transformers'} & set(sys.modules))\n"
              "assert not loaded, loaded\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
