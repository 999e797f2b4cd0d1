"""Re-export: SamplingParams lives in `common` because workers and the gateway use it too."""

from common.sampling_params import SamplingParams

__all__ = ["SamplingParams"]
