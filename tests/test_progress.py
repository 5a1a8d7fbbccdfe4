"""Progress reporting: periodic plain lines off a terminal, nothing when disabled."""

import io

from onnxmerge.progress import Reporter


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_plain_lines_report_phase_count_and_eta_at_each_tenth():
    stream, clock = io.StringIO(), FakeClock()
    reporter = Reporter(stream=stream, interactive=False, interval_s=1e9, clock=clock)
    with reporter.phase("importance table", total=20) as advance:
        for _ in range(20):
            clock.now += 3.0
            advance()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "[importance table] 0/20 elapsed 0s started"
    assert lines[-1] == "[importance table] 20/20 elapsed 1m00s done"
    assert len(lines) == 2 + 10  # one line per tenth
    assert "2/20 elapsed 6s eta 54s" in lines[1]


def test_lines_also_come_every_interval_without_a_total():
    stream, clock = io.StringIO(), FakeClock()
    reporter = Reporter(stream=stream, interactive=False, interval_s=10, clock=clock)
    with reporter.phase("recover") as advance:
        for _ in range(5):
            clock.now += 6.0
            advance(note="agreement 97%")
    lines = stream.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["0", "2", "4", "5"]
    assert lines[1].endswith("agreement 97%") and "eta" not in lines[1]


def test_disabled_reporter_prints_nothing():
    stream = io.StringIO()
    with Reporter(enabled=False, stream=stream).phase("x", total=3) as advance:
        advance(3)
    assert stream.getvalue() == ""


def test_terminal_bar_runs(capsys):
    stream = io.StringIO()
    with Reporter(stream=stream, interactive=True).phase("latency table", total=2) as advance:
        advance()
        advance(note="half")
    assert "latency table" in stream.getvalue()
