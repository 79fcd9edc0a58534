"""GLM-5, GLM-5.1, GLM-5.2 (`glm_moe_dsa`): MLA with DeepSeek sparse attention (and GLM-5.2's IndexShare)."""

from ..arch import Arch, LazyBuilder
from .config import GlmMoeDsaConfig
from .gguf import GGUF
from .schema import SCHEMA
from .sizes import GlmMoeDsaSizes
from .tiny import TINY

ARCH = Arch(
    model_type="glm_moe_dsa",
    title="GLM-5, 5.1, 5.2",
    hf_architecture="GlmMoeDsaForCausalLM",
    config=GlmMoeDsaConfig,
    model=LazyBuilder(f"{__name__}.model", "GlmMoeDsaBuilder"),  # imports torch: on first use
    schema=SCHEMA,
    sizes=GlmMoeDsaSizes(),
    gguf=GGUF,
    tiny=TINY,
)
