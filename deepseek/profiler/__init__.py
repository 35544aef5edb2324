"""The profiler: per-node timeline, hotspots on the roofline, and the fix that applies.

    import deepseek as ds
    with ds.profile(engine) as prof:
        for _ in range(20):
            engine(x)
    report = prof.report()
    report.print()                 # operators by time, hotspots, suggestions
    report.save("profile/")        # trace.json (Chrome/Perfetto), report.json, report.html

Command line: ``deepseek-profiler MODEL --out DIR`` and
``deepseek-profiler --compare before/report.json after/report.json``.
"""

from deepseek.profiler.peaks import DevicePeaks, measure_peaks
from deepseek.profiler.trace import Profile, profile

__all__ = ["profile", "Profile", "ProfileReport", "DevicePeaks", "measure_peaks", "compare"]


def __getattr__(name):  # the report side (html, rich) loads only when asked for
    if name == "ProfileReport":
        from deepseek.profiler.report import ProfileReport

        return ProfileReport
    if name == "compare":
        from deepseek.profiler.compare import compare

        return compare
    raise AttributeError(f"module 'deepseek.profiler' has no attribute {name!r}")
