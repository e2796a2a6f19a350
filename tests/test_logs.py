import subprocess
import sys


def test_rule_logs_keep_the_workflow_messages_and_an_error_and_drop_tensorflows_chatter(tmp_path):
    log = tmp_path / "rule.log"
    script = (
        "import logging\n"
        "from cvaesim.logs import log_to_file\n"
        f"log_to_file({str(log)!r})\n"
        "logging.getLogger('absl').info('Sharding callback duration: 38 microseconds')\n"
        "logging.getLogger('absl').warning('a TensorFlow warning')\n"
        "logging.getLogger('cvaesim.training').info('training on CPU')\n"
        "raise ValueError('cells.h5ad: broken')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 1
    text = log.read_text()
    assert "INFO cvaesim.training: training on CPU" in text
    assert "WARNING absl: a TensorFlow warning" in text
    assert "Sharding callback" not in text
    assert "Traceback" in text and "ValueError: cells.h5ad: broken" in text
    # The terminal gets the one-line error, not the traceback.
    assert result.stderr.strip().endswith("ValueError: cells.h5ad: broken") and "Traceback" not in result.stderr
