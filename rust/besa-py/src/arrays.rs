//! 2-D numpy arrays handed to the simulator, read through typed numpy views (no `unsafe`): in
//! place when C-contiguous, else copied in row-major order.

use besa_sim::Elem;
use besa_sparse::Error;
use bytemuck::NoUninit;
use numpy::{Element, PyReadonlyArray2, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::errors::to_py;

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
    pub elem: Elem,
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

/// Reads `arr` (a numpy array) as a 2-D matrix of dtype `dtype` (`"bfloat16"`: the bits in a
/// uint16 array).
pub fn array_data<'py>(
    arr: &Bound<'py, PyAny>,
    dtype: &str,
    name: &str,
) -> PyResult<ArrayData<'py>> {
    let untyped = arr.cast::<PyUntypedArray>().map_err(|_| {
        to_py(Error::dtype(format!(
            "{name}: expected a numpy array, got {}",
            arr.get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        )))
    })?;
    let shape = untyped.shape().to_vec();
    if shape.len() != 2 {
        return Err(to_py(Error::shape(format!(
            "{name}: expected a 2-D weight or mask, got shape {shape:?}"
        ))));
    }
    let (elem, data) = match dtype {
        "bool" => (Elem::Byte, typed_array::<bool>(arr)),
        "float16" => (Elem::Half, typed_array::<half::f16>(arr)),
        "bfloat16" => (Elem::Half, typed_array::<u16>(arr)),
        "float32" => (Elem::F32, typed_array::<f32>(arr)),
        "float64" => (Elem::F64, typed_array::<f64>(arr)),
        other => {
            return Err(to_py(Error::dtype(format!(
                "{name}: dtype {other} is not supported (expected bool, float16, bfloat16, \
                 float32 or float64)"
            ))))
        }
    };
    let data = data.ok_or_else(|| {
        let got = untyped
            .dtype()
            .str()
            .map(|s| s.to_string())
            .unwrap_or_default();
        to_py(Error::dtype(format!(
            "{name}: the {dtype} weight came as a numpy array of dtype {got}"
        )))
    })?;
    Ok(ArrayData {
        data,
        shape: [shape[0], shape[1]],
        elem,
    })
}
