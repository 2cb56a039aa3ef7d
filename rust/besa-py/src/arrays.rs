//! 2-D numpy arrays handed to the simulator, read through typed numpy views (no `unsafe`): in
//! place when C-contiguous, else copied in row-major order.

use besa_sim::mask::check_dtype;
use besa_sparse::dtype::{self, Dtype};
use bytemuck::NoUninit;
use numpy::{Element, PyReadonlyArray2, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::errors::{bail, ensure, to_py};

/// The bytes of an array, read in place (C-contiguous) or copied in row-major order.
pub trait AsBytes {
    fn bytes(&self) -> &[u8];
}

impl<T: Element + NoUninit> AsBytes for PyReadonlyArray2<'_, T> {
    fn bytes(&self) -> &[u8] {
        bytemuck::cast_slice(self.as_slice().expect("C-contiguous checked"))
    }
}

impl<T: NoUninit> AsBytes for Vec<T> {
    fn bytes(&self) -> &[u8] {
        bytemuck::cast_slice(self)
    }
}

/// A 2-D weight or mask handed over from Python.
pub struct ArrayData<'py> {
    pub data: Box<dyn AsBytes + 'py>,
    pub shape: [usize; 2],
    pub dtype: Dtype,
}

/// The array as a `T` matrix; `None` when its dtype is not `T`.
fn typed_array<'py, T: Element + NoUninit>(
    arr: &Bound<'py, PyAny>,
) -> Option<Box<dyn AsBytes + 'py>> {
    let a = arr.extract::<PyReadonlyArray2<'py, T>>().ok()?;
    if a.is_c_contiguous() {
        Some(Box::new(a))
    } else {
        Some(Box::new(a.as_array().iter().copied().collect::<Vec<T>>()))
    }
}

/// The type name of a Python object, for messages.
fn type_name(x: &Bound<'_, PyAny>) -> String {
    x.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_default()
}

/// Reads `arr` (a numpy array) as a 2-D matrix of the safetensors dtype `dtype` (`"BF16"`: the
/// bits in a uint16 array); the dtype must be one the simulator reads.
pub fn array_data<'py>(
    arr: &Bound<'py, PyAny>,
    dtype: &str,
    name: &str,
) -> PyResult<ArrayData<'py>> {
    let Ok(untyped) = arr.cast::<PyUntypedArray>() else {
        bail!(
            dtype,
            "{name}: expected a numpy array, got {}",
            type_name(arr)
        );
    };
    let shape = untyped.shape().to_vec();
    ensure!(
        shape.len() == 2,
        shape,
        "{name}: expected a 2-D weight or mask, got shape {shape:?}"
    );
    let dt = dtype::parse(dtype)
        .and_then(|d| check_dtype(d).map(|()| d))
        .map_err(|e| to_py(e.context(name)))?;
    let data = match dt {
        Dtype::BOOL => typed_array::<bool>(arr),
        Dtype::F16 => typed_array::<half::f16>(arr),
        Dtype::BF16 => typed_array::<u16>(arr),
        Dtype::F32 => typed_array::<f32>(arr),
        Dtype::F64 => typed_array::<f64>(arr),
        other => bail!(dtype, "{name}: numpy has no {other:?} arrays"),
    };
    let Some(data) = data else {
        let got = untyped.dtype().str().map(|s| s.to_string());
        bail!(
            dtype,
            "{name}: the {dtype} weight came as a numpy array of dtype {}",
            got.unwrap_or_default()
        );
    };
    Ok(ArrayData {
        data,
        shape: [shape[0], shape[1]],
        dtype: dt,
    })
}
