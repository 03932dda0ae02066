//! The contract's `record` as the host lowers it into a guest: borrowed from the agent's own records, and
//! written a batch at a time.
//!
//! The generated bindings take owned records (a clone of every string before the canonical ABI copies it again)
//! and lower a record field by field, each scalar write looking the guest's memory up afresh — about forty
//! lookups per record, a third of what crossing into the guest cost (`perf` on the residency bench). Here the
//! type check stays derived (field names, order and types are checked against the component when the function
//! is looked up), and the lowering of a list of records does the ABI's work in two passes: every string's
//! `realloc` first (the calls into the guest the canonical ABI requires, one per string), then one pass over
//! memory that copies the bytes and writes the records. A plugin that declares it tolerates it
//! ([`super::bulk_arguments`]) gets one `realloc` for all of a batch's strings and tag lists instead: each call
//! into the guest costs about as much as copying a few hundred bytes.
//!
//! This implements `wasmtime::component::Lower` by hand, which uses wasmtime's hidden lowering API: the
//! workspace pins wasmtime's exact version for it, and anything but UTF-8 strings takes the field-by-field path.

use wasmtime::component::__internal::wasmtime_environ::component::StringEncoding;
use wasmtime::component::__internal::{InterfaceType, LowerContext};
use wasmtime::component::{ComponentType, Lower};
use wasmtime::{Result, bail, format_err};

use super::rtypes;

/// Fields in the contract's order.
const FIELDS: usize = 11;
/// Largest string the canonical ABI lets a host copy.
const MAX_STRING: usize = (1 << 31) - 1;

#[derive(ComponentType)]
#[component(record)]
pub(super) struct GuestRecord<'a> {
    pub(super) kind: rtypes::Kind,
    #[component(name = "system-id")]
    pub(super) system_id: &'a str,
    pub(super) id: &'a str,
    pub(super) project: Option<&'a str>,
    pub(super) namespace: Option<&'a str>,
    pub(super) category: Option<&'a str>,
    pub(super) name: Option<&'a str>,
    pub(super) tags: &'a [String],
    pub(super) text: Option<&'a str>,
    pub(super) metadata: Option<&'a str>,
    pub(super) embedding: Option<&'a [f32]>,
}

/// Byte offsets of the fields within a record, as the canonical ABI lays them out.
fn field_offsets() -> [usize; FIELDS] {
    let mut at = 0;
    [
        <rtypes::Kind as ComponentType>::ABI.next_field32_size(&mut at),
        <&str as ComponentType>::ABI.next_field32_size(&mut at),
        <&str as ComponentType>::ABI.next_field32_size(&mut at),
        <Option<&str> as ComponentType>::ABI.next_field32_size(&mut at),
        <Option<&str> as ComponentType>::ABI.next_field32_size(&mut at),
        <Option<&str> as ComponentType>::ABI.next_field32_size(&mut at),
        <Option<&str> as ComponentType>::ABI.next_field32_size(&mut at),
        <&[String] as ComponentType>::ABI.next_field32_size(&mut at),
        <Option<&str> as ComponentType>::ABI.next_field32_size(&mut at),
        <Option<&str> as ComponentType>::ABI.next_field32_size(&mut at),
        <Option<&[f32]> as ComponentType>::ABI.next_field32_size(&mut at),
    ]
}

/// Where an `option<string>`'s string sits: after its one-byte discriminant, at the string's alignment.
pub(super) fn option_payload_offset() -> usize {
    let align = <&str as ComponentType>::ALIGN32 as usize;
    1usize.div_ceil(align) * align
}

/// The optional strings, in field order (indexes 3–6 and 8–9 of [`field_offsets`]).
fn optional_strings<'a>(r: &GuestRecord<'a>) -> [(usize, Option<&'a str>); 6] {
    [(3, r.project), (4, r.namespace), (5, r.category), (6, r.name), (8, r.text), (9, r.metadata)]
}

/// The guest addresses `realloc` gave one record's strings.
struct Placed {
    system_id: u32,
    id: u32,
    optional: [u32; 6],
    tags_list: u32,
    /// Index of this record's first tag in the batch's tag addresses.
    first_tag: usize,
}

fn place_string<T>(cx: &mut LowerContext<'_, T>, s: &str) -> Result<u32> {
    if s.len() > MAX_STRING {
        bail!("string length of {} too large to copy into wasm", s.len());
    }
    Ok(u32::try_from(cx.realloc(0, 0, 1, s.len())?)?)
}

/// Whether the store's plugin accepts all of a call's arguments in one block.
fn bulk_arguments<T: 'static>(cx: &LowerContext<'_, T>) -> bool {
    let data: &dyn std::any::Any = cx.store.data();
    data.downcast_ref::<super::HostState>().is_some_and(|state| state.bulk_arguments)
}

/// The canonical ABI's allocations: one `realloc` per string and per tag list.
fn place_each<T>(cx: &mut LowerContext<'_, T>, items: &[GuestRecord<'_>]) -> Result<(Vec<Placed>, Vec<u32>)> {
    let pair = <&str as ComponentType>::SIZE32;
    let mut placed = Vec::with_capacity(items.len());
    let mut tags = Vec::new();
    for r in items {
        let system_id = place_string(cx, r.system_id)?;
        let id = place_string(cx, r.id)?;
        let mut optional = [0u32; 6];
        for (slot, (_, value)) in optional.iter_mut().zip(optional_strings(r)) {
            if let Some(s) = value {
                *slot = place_string(cx, s)?;
            }
        }
        let list_bytes = r.tags.len().checked_mul(pair).ok_or_else(|| format_err!("tag list too large"))?;
        let tags_list = u32::try_from(cx.realloc(0, 0, <&str as ComponentType>::ALIGN32, list_bytes)?)?;
        let first_tag = tags.len();
        for tag in r.tags {
            tags.push(place_string(cx, tag)?);
        }
        placed.push(Placed { system_id, id, optional, tags_list, first_tag });
    }
    Ok((placed, tags))
}

/// The same addresses carved out of one `realloc`: each record's tag list (aligned as the ABI wants) followed by
/// its strings.
fn place_in_one_block<T>(cx: &mut LowerContext<'_, T>, items: &[GuestRecord<'_>]) -> Result<(Vec<Placed>, Vec<u32>)> {
    let pair = <&str as ComponentType>::SIZE32;
    let list_align = <&str as ComponentType>::ALIGN32;
    let too_large = || format_err!("a batch's arguments do not fit in 4 GiB of guest memory");
    let mut end = 0usize;
    let mut take = |len: usize, align: usize| -> Result<u32> {
        let start = end.checked_next_multiple_of(align).ok_or_else(too_large)?;
        end = start.checked_add(len).ok_or_else(too_large)?;
        u32::try_from(start).map_err(|_| too_large())
    };
    let mut placed = Vec::with_capacity(items.len());
    let mut tags = Vec::new();
    for r in items {
        let list_bytes = r.tags.len().checked_mul(pair).ok_or_else(too_large)?;
        let tags_list = take(list_bytes, list_align as usize)?;
        let system_id = take(r.system_id.len(), 1)?;
        let id = take(r.id.len(), 1)?;
        let mut optional = [0u32; 6];
        for (slot, (_, value)) in optional.iter_mut().zip(optional_strings(r)) {
            if let Some(s) = value {
                *slot = take(s.len(), 1)?;
            }
        }
        let first_tag = tags.len();
        for tag in r.tags {
            tags.push(take(tag.len(), 1)?);
        }
        placed.push(Placed { system_id, id, optional, tags_list, first_tag });
    }
    if end > u32::MAX as usize {
        return Err(too_large());
    }
    // At least one byte, so that even a batch of empty strings points at memory the guest gave out.
    let base = u32::try_from(cx.realloc(0, 0, list_align, end.max(1))?)?;
    let at = |offset: u32| base.checked_add(offset).ok_or_else(too_large);
    for (p, r) in placed.iter_mut().zip(items) {
        p.tags_list = at(p.tags_list)?;
        p.system_id = at(p.system_id)?;
        p.id = at(p.id)?;
        for (slot, (_, value)) in p.optional.iter_mut().zip(optional_strings(r)) {
            if value.is_some() {
                *slot = at(*slot)?;
            }
        }
    }
    for tag in &mut tags {
        *tag = at(*tag)?;
    }
    Ok((placed, tags))
}

fn write(memory: &mut [u8], at: usize, bytes: &[u8]) -> Result<()> {
    match at.checked_add(bytes.len()).and_then(|end| memory.get_mut(at..end)) {
        Some(dst) => {
            dst.copy_from_slice(bytes);
            Ok(())
        }
        None => bail!("guest address {at} (+{}) is outside its memory", bytes.len()),
    }
}

fn write_pair(memory: &mut [u8], at: usize, ptr: u32, len: usize) -> Result<()> {
    let mut pair = [0u8; 8];
    pair[..4].copy_from_slice(&ptr.to_le_bytes());
    pair[4..].copy_from_slice(&u32::try_from(len)?.to_le_bytes());
    write(memory, at, &pair)
}

fn kind_case(kind: &rtypes::Kind) -> u8 {
    // The contract's case order (`enum kind` in wit/v0.1/plugin.wit); the derived type check of
    // `rtypes::Kind` guarantees the component agrees.
    match kind {
        rtypes::Kind::Conversation => 0,
        rtypes::Kind::Reflection => 1,
        rtypes::Kind::Entity => 2,
        rtypes::Kind::Relation => 3,
        rtypes::Kind::Metric => 4,
    }
}

impl GuestRecord<'_> {
    /// The derived lowering's behaviour, field by field: for string encodings other than UTF-8.
    fn lower_each_field<T>(&self, cx: &mut LowerContext<'_, T>, ty: InterfaceType, offset: usize) -> Result<()> {
        let InterfaceType::Record(index) = ty else { bail!("the contract's record is not a record: {ty:?}") };
        let types: Vec<InterfaceType> = cx.types[index].fields.iter().map(|f| f.ty).collect();
        let [kind, system_id, id, project, namespace, category, name, tags, text, metadata, embedding] = types[..]
        else {
            bail!("the contract's record has {} fields, expected {FIELDS}", types.len());
        };
        let at = field_offsets().map(|o| offset + o);
        self.kind.linear_lower_to_memory(cx, kind, at[0])?;
        self.system_id.linear_lower_to_memory(cx, system_id, at[1])?;
        self.id.linear_lower_to_memory(cx, id, at[2])?;
        self.project.linear_lower_to_memory(cx, project, at[3])?;
        self.namespace.linear_lower_to_memory(cx, namespace, at[4])?;
        self.category.linear_lower_to_memory(cx, category, at[5])?;
        self.name.linear_lower_to_memory(cx, name, at[6])?;
        self.tags.linear_lower_to_memory(cx, tags, at[7])?;
        self.text.linear_lower_to_memory(cx, text, at[8])?;
        self.metadata.linear_lower_to_memory(cx, metadata, at[9])?;
        self.embedding.linear_lower_to_memory(cx, embedding, at[10])
    }
}

// SAFETY: writes exactly the canonical ABI layout of the record type derived above (offsets from the same ABI
// descriptions the derive uses), every address checked against the guest's memory.
#[allow(unsafe_code, reason = "`Lower` is an unsafe trait: implementing it is how a host type picks its lowering")]
unsafe impl Lower for GuestRecord<'_> {
    fn linear_lower_to_flat<T>(
        &self,
        _cx: &mut LowerContext<'_, T>,
        _ty: InterfaceType,
        _dst: &mut std::mem::MaybeUninit<Self::Lower>,
    ) -> Result<()> {
        // Records only cross as elements of `decide`'s list, which always goes through memory.
        bail!("a record is only passed inside a list")
    }

    fn linear_lower_to_memory<T>(&self, cx: &mut LowerContext<'_, T>, ty: InterfaceType, offset: usize) -> Result<()> {
        Self::linear_store_list_to_memory(cx, ty, offset, std::slice::from_ref(self))
    }

    fn linear_store_list_to_memory<T>(
        cx: &mut LowerContext<'_, T>,
        ty: InterfaceType,
        offset: usize,
        items: &[Self],
    ) -> Result<()> {
        let stride = <Self as ComponentType>::SIZE32;
        if cx.options().string_encoding != StringEncoding::Utf8 {
            for (i, item) in items.iter().enumerate() {
                item.lower_each_field(cx, ty, offset + i * stride)?;
            }
            return Ok(());
        }
        let InterfaceType::Record(index) = ty else { bail!("the contract's record is not a record: {ty:?}") };
        let Some(embedding_ty) = cx.types[index].fields.get(FIELDS - 1).map(|f| f.ty) else {
            bail!("the contract's record has fewer than {FIELDS} fields");
        };
        let fields = field_offsets();
        let payload = option_payload_offset();
        let pair = <&str as ComponentType>::SIZE32;

        // 1. Every allocation: one per string and tag list, or one for all of them.
        let (placed, tags) = if bulk_arguments(cx) { place_in_one_block(cx, items)? } else { place_each(cx, items)? };

        // 2. One pass over memory: the strings' bytes, the tag lists, the records.
        let memory = cx.as_slice_mut();
        for (i, (r, p)) in items.iter().zip(&placed).enumerate() {
            let base = offset + i * stride;
            write(memory, p.system_id as usize, r.system_id.as_bytes())?;
            write(memory, p.id as usize, r.id.as_bytes())?;
            write(memory, base + fields[0], &[kind_case(&r.kind)])?;
            write_pair(memory, base + fields[1], p.system_id, r.system_id.len())?;
            write_pair(memory, base + fields[2], p.id, r.id.len())?;
            for (&address, (field, value)) in p.optional.iter().zip(optional_strings(r)) {
                match value {
                    Some(s) => {
                        write(memory, address as usize, s.as_bytes())?;
                        write(memory, base + fields[field], &[1])?;
                        write_pair(memory, base + fields[field] + payload, address, s.len())?;
                    }
                    None => write(memory, base + fields[field], &[0])?,
                }
            }
            for (j, tag) in r.tags.iter().enumerate() {
                let address = tags[p.first_tag + j];
                write(memory, address as usize, tag.as_bytes())?;
                write_pair(memory, p.tags_list as usize + j * pair, address, tag.len())?;
            }
            write_pair(memory, base + fields[7], p.tags_list, r.tags.len())?;
            if r.embedding.is_none() {
                write(memory, base + fields[10], &[0])?;
            }
        }

        // 3. Embeddings (only for policies that asked for them) through the generic path.
        for (i, r) in items.iter().enumerate() {
            if r.embedding.is_some() {
                r.embedding.linear_lower_to_memory(cx, embedding_ty, offset + i * stride + fields[10])?;
            }
        }
        Ok(())
    }
}
