//! The decisions a residency policy returns, lifted out of the guest's memory in one pass.
//!
//! wasmtime's derived lifting reads a `list<decision>` element by element, each through a fresh lookup of the
//! guest's memory and of every field's offset — after the arguments went into one block
//! (`guest_record.rs`), that per-element work was the largest host-side cost of a residency call left (`perf`
//! on the residency bench). Here the list's type check stays derived (it is `Vec<rtypes::Decision>`'s), and
//! lifting reads the list with the same checks wasmtime makes — bounds, alignment, enum and option
//! discriminants, UTF-8, and the host-call fuel that caps what a guest can make the host allocate — in one
//! pass. Like `guest_record.rs` this uses wasmtime's hidden lifting API (the workspace pins its version), and
//! any string encoding but UTF-8 takes the derived path.

use wasmtime::component::__internal::wasmtime_environ::component::StringEncoding;
use wasmtime::component::__internal::{CanonicalAbiInfo, InstanceType, InterfaceType, LiftContext};
use wasmtime::component::{ComponentType, Lift};
use wasmtime::{Result, bail};

use super::rtypes;

/// A `list<decision>` result.
pub(super) struct GuestDecisions(pub(super) Vec<rtypes::Decision>);

// SAFETY: exactly the canonical ABI description of `list<decision>`, taken from `Vec<rtypes::Decision>`, whose
// type check is also the one used.
#[allow(unsafe_code, reason = "`ComponentType` is an unsafe trait: a host type declares its ABI through it")]
unsafe impl ComponentType for GuestDecisions {
    type Lower = <Vec<rtypes::Decision> as ComponentType>::Lower;

    const ABI: CanonicalAbiInfo = <Vec<rtypes::Decision> as ComponentType>::ABI;

    fn typecheck(ty: &InterfaceType, types: &InstanceType<'_>) -> Result<()> {
        <Vec<rtypes::Decision> as ComponentType>::typecheck(ty, types)
    }
}

/// Field offsets within a `decision` and its size and alignment, as the canonical ABI lays it out.
struct Layout {
    redactions: usize,
    reason: usize,
    size: usize,
    align: usize,
}

fn layout() -> Layout {
    let mut at = 0;
    let route = <rtypes::Route as ComponentType>::ABI.next_field32_size(&mut at);
    let redactions = <Vec<rtypes::Redaction> as ComponentType>::ABI.next_field32_size(&mut at);
    let reason = <Option<String> as ComponentType>::ABI.next_field32_size(&mut at);
    debug_assert_eq!(route, 0);
    let align = <rtypes::Route as ComponentType>::ALIGN32
        .max(<Vec<rtypes::Redaction> as ComponentType>::ALIGN32)
        .max(<Option<String> as ComponentType>::ALIGN32) as usize;
    Layout { redactions, reason, size: at.next_multiple_of(align), align }
}

fn u32_at(memory: &[u8], at: usize) -> Result<u32> {
    match at.checked_add(4).and_then(|end| memory.get(at..end)) {
        Some(b) => Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        None => bail!("guest address {at} is outside its memory"),
    }
}

fn byte_at(memory: &[u8], at: usize) -> Result<u8> {
    match memory.get(at) {
        Some(b) => Ok(*b),
        None => bail!("guest address {at} is outside its memory"),
    }
}

/// A `(pointer, length)` pair's range of `len * size` bytes, checked against memory and alignment.
fn checked_range(memory: &[u8], ptr: u32, len: u32, size: usize, align: usize) -> Result<std::ops::Range<usize>> {
    let start = ptr as usize;
    match (len as usize).checked_mul(size).and_then(|n| start.checked_add(n)) {
        Some(end) if end <= memory.len() => {
            if !start.is_multiple_of(align) {
                bail!("list pointer is not aligned");
            }
            Ok(start..end)
        }
        _ => bail!("list pointer/length out of bounds of memory"),
    }
}

impl GuestDecisions {
    fn lift_utf8(cx: &mut LiftContext<'_>, ptr: u32, len: u32) -> Result<Self> {
        let memory = cx.memory();
        let layout = layout();
        let list = checked_range(memory, ptr, len, layout.size, layout.align)?;
        cx.consume_fuel_array(len as usize, size_of::<rtypes::Decision>())?;
        let pair = <rtypes::Redaction as ComponentType>::SIZE32;
        let pair_align = <rtypes::Redaction as ComponentType>::ALIGN32 as usize;
        let string_offset = super::guest_record::option_payload_offset();
        let mut decisions = Vec::with_capacity(len as usize);
        for base in list.step_by(layout.size) {
            // The contract's case order (`enum route` in wit/v0.1/plugin.wit); the derived type check of the
            // list guarantees the component agrees.
            let route = match byte_at(memory, base)? {
                0 => rtypes::Route::Cloud,
                1 => rtypes::Route::Onprem,
                2 => rtypes::Route::Drop,
                n => bail!("unexpected discriminant: {n}"),
            };
            let (at, count) =
                (u32_at(memory, base + layout.redactions)?, u32_at(memory, base + layout.redactions + 4)?);
            let range = checked_range(memory, at, count, pair, pair_align)?;
            cx.consume_fuel_array(count as usize, size_of::<rtypes::Redaction>())?;
            let mut redactions = Vec::with_capacity(count as usize);
            for r in range.step_by(pair) {
                redactions.push(rtypes::Redaction { start: u32_at(memory, r)?, end: u32_at(memory, r + 4)? });
            }
            let reason = match byte_at(memory, base + layout.reason)? {
                0 => None,
                1 => {
                    let field = base + layout.reason + string_offset;
                    let (at, len) = (u32_at(memory, field)?, u32_at(memory, field + 4)?);
                    let bytes = checked_range(memory, at, len, 1, 1)?;
                    cx.consume_fuel(bytes.len())?;
                    match std::str::from_utf8(&memory[bytes]) {
                        Ok(s) => Some(s.to_owned()),
                        Err(e) => bail!("invalid utf-8 in a decision's reason: {e}"),
                    }
                }
                n => bail!("invalid option discriminant: {n}"),
            };
            decisions.push(rtypes::Decision { route, redactions, reason });
        }
        Ok(GuestDecisions(decisions))
    }
}

// SAFETY: reads the canonical ABI layout of `list<decision>` (offsets from the same ABI descriptions the derived
// lifting uses), every read bounds-checked against the guest's memory.
#[allow(unsafe_code, reason = "`Lift` is an unsafe trait: implementing it is how a host type picks its lifting")]
unsafe impl Lift for GuestDecisions {
    fn linear_lift_from_flat(cx: &mut LiftContext<'_>, ty: InterfaceType, src: &Self::Lower) -> Result<Self> {
        // A list result always comes back through memory; this is the derived path, for completeness.
        Ok(GuestDecisions(<Vec<rtypes::Decision> as Lift>::linear_lift_from_flat(cx, ty, src)?))
    }

    fn linear_lift_from_memory(cx: &mut LiftContext<'_>, ty: InterfaceType, bytes: &[u8]) -> Result<Self> {
        if cx.options().string_encoding != StringEncoding::Utf8 {
            return Ok(GuestDecisions(<Vec<rtypes::Decision> as Lift>::linear_lift_from_memory(cx, ty, bytes)?));
        }
        let (Some(ptr), Some(len)) = (bytes.get(..4), bytes.get(4..8)) else {
            bail!("a list result is {} bytes, expected 8", bytes.len());
        };
        let ptr = u32::from_le_bytes([ptr[0], ptr[1], ptr[2], ptr[3]]);
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]);
        Self::lift_utf8(cx, ptr, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_pointers_are_checked_for_bounds_overflow_and_alignment() {
        let memory = [0u8; 64];
        assert_eq!(checked_range(&memory, 8, 3, 8, 4).unwrap(), 8..32);
        assert_eq!(checked_range(&memory, 64, 0, 8, 4).unwrap(), 64..64, "an empty list at the end is fine");
        assert!(checked_range(&memory, 60, 1, 8, 4).unwrap_err().to_string().contains("out of bounds"));
        assert!(checked_range(&memory, 8, u32::MAX, 8, 4).unwrap_err().to_string().contains("out of bounds"));
        assert!(checked_range(&memory, u32::MAX, 1, 1, 1).unwrap_err().to_string().contains("out of bounds"));
        assert!(checked_range(&memory, 6, 1, 8, 4).unwrap_err().to_string().contains("not aligned"));
        assert!(u32_at(&memory, 61).is_err());
        assert!(byte_at(&memory, 64).is_err());
    }

    #[test]
    fn the_decision_layout_is_the_canonical_one() {
        // route (u8) at 0, redactions (ptr, len) at 4, reason (discriminant, then ptr, len at 4 more) at 12.
        let layout = layout();
        assert_eq!((layout.redactions, layout.reason, layout.size, layout.align), (4, 12, 24, 4));
        assert_eq!(super::super::guest_record::option_payload_offset(), 4);
    }
}
