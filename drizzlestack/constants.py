"""Numbers the steps share, defined once.

The drizzle kernels keep STScI drizzle's own rounded ``2.3548`` (``drizzle/kernels_centred.py``)
on purpose: their Gaussian kernel must give STScI's numbers, not the exact constant.
"""

import math

#: FWHM of a Gaussian per unit sigma, ``2 sqrt(2 ln 2)`` = 2.35482
SIGMA_TO_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))
#: sigma of a Gaussian per unit FWHM
FWHM_TO_SIGMA = 1.0 / SIGMA_TO_FWHM
