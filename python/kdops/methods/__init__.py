"""Published knowledge-distillation methods built on the kdops ops (see METHODS.md): each cites its
paper, states which released code it matches and lists every difference from it."""

# classification-style logit KD
from .ctkd import CTKD
from .dho import DHO, DualHead
from .dist import DIST
from .dkd import DKD
from .hinton import HintonKD
from .logit_standardization import (LogitStandardized, LogitStandardizedDKD, LogitStandardizedKD,
                                    standardize_logits)
from .multi_teacher import MultiTeacherKD
from .nkd import NKD
from .pskd import PSKD
from .uskd import USKD

# LLM token-level distillation
from .adaspec import AdaSPEC
from .akl import AKL, akl_gaps
from .distillm import DistiLLM
from .gkd import GKD
from .gram_relation import GramRelationKD
from .infigfusion import InfiGFusion
from .miniplm import DifferenceSampler, difference_scores
from .offline_topk import OfflineTopKKD, topk_teacher
from .swing import LinearTemperature, SwingDistillation
from .token_kd import TokenKD, acceptance_rate
from .trg import TRG

__all__ = [
    "AKL", "AdaSPEC", "CTKD", "DHO", "DIST", "DKD", "DifferenceSampler", "DistiLLM", "DualHead",
    "GKD", "GramRelationKD", "HintonKD", "InfiGFusion", "LinearTemperature", "LogitStandardized",
    "LogitStandardizedDKD", "LogitStandardizedKD", "MultiTeacherKD", "NKD", "OfflineTopKKD", "PSKD",
    "SwingDistillation", "TRG", "TokenKD", "USKD", "acceptance_rate", "akl_gaps", "difference_scores",
    "standardize_logits", "topk_teacher",
]
