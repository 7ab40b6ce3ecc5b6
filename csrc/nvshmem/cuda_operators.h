// Include first in every .cu file that includes NVSHMEM, before any CUDA header. PyTorch's extension build
// defines these macros (to keep its own half/bfloat16 operators); NVSHMEM's device headers need CUDA's
// operators, and no .cu file of the NVSHMEM extension includes torch (torch glue lives in the .cpp files), so
// take them back.
#pragma once

#undef __CUDA_NO_HALF_OPERATORS__
#undef __CUDA_NO_HALF_CONVERSIONS__
#undef __CUDA_NO_HALF2_OPERATORS__
#undef __CUDA_NO_BFLOAT16_CONVERSIONS__
#undef __CUDA_NO_BFLOAT16_OPERATORS__
#undef __CUDA_NO_BFLOAT162_OPERATORS__
