"""Config: params.yaml loaded once into typed sections (`schema`), profiles written into it the way
`dvc exp run -S` writes overrides (`profiles`), dataset locations (`datasets`), and the read trace used by the
test that each stage reads only the params dvc.yaml declares (`trace`)."""

from edgeqa.config.schema import (
    GRID_WORDS,
    SPLITS,
    BaseLMConfig,
    DecoderConfig,
    DistillConfig,
    EvaluateConfig,
    GateConfig,
    GateOverrides,
    GateRules,
    IngestConfig,
    LabelConfig,
    MaskFactsConfig,
    Params,
    ParamsError,
    PasteConfig,
    PathsConfig,
    PruneConfig,
    QuantizeConfig,
    RecoveryConfig,
    SFTConfig,
    StudentConfig,
    StudentStageConfig,
    SynthCategory,
    SynthConfig,
    TeacherConfig,
    ThresholdRule,
    ValidateConfig,
    load_params,
    parse_params,
)

__all__ = ["GRID_WORDS", "SPLITS", "BaseLMConfig", "DecoderConfig", "DistillConfig", "EvaluateConfig", "GateConfig",
           "GateOverrides", "GateRules", "IngestConfig", "LabelConfig", "MaskFactsConfig", "Params", "ParamsError",
           "PasteConfig", "PathsConfig", "PruneConfig", "QuantizeConfig", "RecoveryConfig", "SFTConfig",
           "StudentConfig", "StudentStageConfig", "SynthCategory", "SynthConfig", "TeacherConfig", "ThresholdRule",
           "ValidateConfig", "load_params", "parse_params"]
