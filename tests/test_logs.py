import subprocess
import sys


def test_rule_logs_take_all_output_but_per_epoch_absl_lines_and_the_terminal_gets_the_error(tmp_path):
    # TensorFlow's C++ code writes to the process's stderr, past sys.stderr: os.write stands in for it.
    log = tmp_path / "rule.log"
    script = (
        "import logging\n"
        "from cvaesim.logs import log_to_file\n"
        f"log_to_file({str(log)!r})\n"
        "logging.getLogger('absl').info('Sharding callback duration: 38 microseconds')\n"
        "logging.getLogger('absl').warning('a TensorFlow warning')\n"
        "logging.getLogger('cvaesim.training').info('training on CPU')\n"
        "import os; os.write(2, b'I0000 port.cc:153] oneDNN custom operations are on\\n')\n"
        "raise ValueError('cells.h5ad: broken')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 1
    text = log.read_text()
    assert "INFO cvaesim.training: training on CPU" in text
    assert "WARNING absl: a TensorFlow warning" in text
    assert "Sharding callback" not in text
    assert "oneDNN custom operations are on" in text and "oneDNN" not in result.stderr
    assert "Traceback" in text and "ValueError: cells.h5ad: broken" in text
    # The terminal gets the one-line error, not the traceback.
    assert result.stderr.strip().endswith("ValueError: cells.h5ad: broken") and "Traceback" not in result.stderr
