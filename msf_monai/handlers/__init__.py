"""Ignite handlers used by the bundles, grouped by when they run: Phase II statistics and flow
fitting (:mod:`.style_statistics`), training monitors (:mod:`.training`), evaluation and
inference (:mod:`.evaluation`). The configs name them as ``msf_monai.handlers.<Name>``."""

from .evaluation import CaseProgressLogger, PerCaseDiceWriter, case_dice
from .style_statistics import StyleFlowFitter, StyleStatisticsIteration, StyleStatisticsRecorder, plot_style_samples
from .training import DataWaitTimer, PerturbationMonitor, StylizedImageSaver

__all__ = [
    "StyleStatisticsIteration",
    "StyleStatisticsRecorder",
    "StyleFlowFitter",
    "plot_style_samples",
    "PerturbationMonitor",
    "StylizedImageSaver",
    "DataWaitTimer",
    "case_dice",
    "PerCaseDiceWriter",
    "CaseProgressLogger",
]
