"""GLM-5, GLM-5.1, GLM-5.2 (`glm_moe_dsa`): MLA with DeepSeek sparse attention (and GLM-5.2's IndexShare)."""

from ..arch import Arch
from .config import GlmMoeDsaConfig
from .gguf import GGUF
from .model import GlmMoeDsaBuilder
from .schema import SCHEMA
from .sizes import GlmMoeDsaSizes
from .tiny import TINY

ARCH = Arch(
    model_type="glm_moe_dsa",
    title="GLM-5, 5.1, 5.2",
    hf_architecture="GlmMoeDsaForCausalLM",
    config=GlmMoeDsaConfig,
    model=GlmMoeDsaBuilder(),
    schema=SCHEMA,
    sizes=GlmMoeDsaSizes(),
    gguf=GGUF,
    tiny=TINY,
)
