//! The column chunk of a float vector (`embedding`): its floats byte-stream-split, as before, and every page
//! compressed as one standard zstd frame in which each byte stream starts a block of its own.
//!
//! zstd codes the literals of a block with one Huffman table. Parquet's writer compresses a split page in one
//! call, so the 128 KiB block that holds the end of the third stream (mantissa bits: uniform) and the start of
//! the fourth (sign and exponent: ~2.6 bits of entropy per byte) codes both with one table, and a page smaller
//! than a block (fewer than ~85 vectors of 384 floats) codes all four streams with one. With 384-float vectors
//! that cost 22 B per vector on a 500-row page and 120 B on a 45-row one (BENCHMARKS.md, session 25). Ending a
//! block at each stream boundary (`ZSTD_e_flush`) gives every stream its own table whatever the page size, and any
//! zstd decoder reads the frame as usual.
//!
//! The match finder is made nearly blind (hash log 6, minimum match 7): the streams hold no repeats worth a match,
//! and the short matches level 1 finds in the exponent stream cost more than coding its bytes as literals
//! (151 → 134 B per vector), at about twice level 1's speed.
//!
//! The pages are format version 1 data pages, whose repetition levels (a run per vector, 5 B each) are compressed
//! with the values; a version 2 page stores them raw.

use std::borrow::Cow;
use std::io::Write;
use std::sync::Arc;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Float32Type};
use bytes::Bytes;
use parquet::basic::{Compression, Encoding, Type as PhysicalType, ZstdLevel};
use parquet::column::page::{CompressedPage, Page, PageWriteSpec, PageWriter};
use parquet::column::writer::{ColumnCloseResult, ColumnWriter, get_column_writer};
use parquet::errors::ParquetError;
use parquet::file::properties::{EnabledStatistics, WriterProperties, WriterVersion};
use parquet::file::writer::{SerializedPageWriter, TrackedWrite};
use parquet::schema::types::ColumnDescPtr;
use zstd_safe::zstd_sys::ZSTD_EndDirective;

use super::ColdError;

/// Rows handed to the column writer at a time, so that the levels built for them stay small.
const ROWS_PER_WRITE: usize = 1024;

/// Is `column` (a top-level field and its Parquet leaf) written here: a list of FLOAT.
pub(crate) fn is_vector(data_type: &DataType, column: &ColumnDescPtr) -> bool {
    let item = match data_type {
        DataType::List(item) | DataType::FixedSizeList(item, _) => item,
        _ => return false,
    };
    item.data_type() == &DataType::Float32
        && column.physical_type() == PhysicalType::FLOAT
        && column.max_rep_level() == 1
}

/// The writer settings for vector columns: split floats in version 1 pages, no dictionary and no statistics
/// (neither helps a vector), compressed by [`SplitStreamPages`] rather than by the column writer.
pub(crate) fn vector_properties() -> Arc<WriterProperties> {
    Arc::new(
        WriterProperties::builder()
            .set_writer_version(WriterVersion::PARQUET_1_0)
            .set_compression(Compression::UNCOMPRESSED)
            .set_dictionary_enabled(false)
            .set_encoding(Encoding::BYTE_STREAM_SPLIT)
            .set_statistics_enabled(EnabledStatistics::None)
            .build(),
    )
}

/// Encodes `arrays` (one row group's slices of a vector column, in order) into a column chunk: its bytes and
/// what the row group writer needs to splice them in.
pub(crate) fn write_chunk(
    descriptor: ColumnDescPtr,
    properties: &Arc<WriterProperties>,
    arrays: &[&dyn Array],
) -> Result<(Bytes, ColumnCloseResult), ColdError> {
    let mut sink = TrackedWrite::new(Vec::new());
    let mut close = {
        let pages = SplitStreamPages::new(&mut sink)?;
        let ColumnWriter::FloatColumnWriter(mut writer) =
            get_column_writer(descriptor.clone(), properties.clone(), Box::new(pages))
        else {
            return Err(ColdError::Corrupt(format!("{} is not a FLOAT column", descriptor.path())));
        };
        let mut levels = Levels::new(&descriptor)?;
        for array in arrays {
            for start in (0..array.len()).step_by(ROWS_PER_WRITE) {
                let rows = array.slice(start, ROWS_PER_WRITE.min(array.len() - start));
                let values = levels.fill(rows.as_ref())?;
                writer.write_batch(values.as_ref(), Some(&levels.definition), Some(&levels.repetition))?;
            }
        }
        writer.close()?
    };
    // The pages are zstd frames: the footer says so (it names the codec, not how the frames were made).
    close.metadata = close.metadata.into_builder().set_compression(Compression::ZSTD(ZstdLevel::default())).build()?;
    Ok((Bytes::from(sink.into_inner()?), close))
}

/// The definition and repetition levels of some rows of a vector column, rebuilt for each write.
struct Levels {
    /// A missing vector.
    null_list: i16,
    /// A vector without elements.
    empty_list: i16,
    /// A NULL element of a vector.
    null_item: i16,
    /// A float.
    item: i16,
    definition: Vec<i16>,
    repetition: Vec<i16>,
    values: Vec<f32>,
}

impl Levels {
    fn new(descriptor: &ColumnDescPtr) -> Result<Levels, ColdError> {
        // optional group (LIST) { repeated group list { optional float element } }, each `optional` one level.
        let max = descriptor.max_def_level();
        let item_nullable = descriptor.self_type().is_optional();
        let list_nullable = max - 1 - i16::from(item_nullable);
        if !(0..=1).contains(&list_nullable) {
            return Err(ColdError::Corrupt(format!(
                "{} has definition level {max}: not a list of floats",
                descriptor.path()
            )));
        }
        Ok(Levels {
            null_list: 0,
            empty_list: list_nullable,
            null_item: list_nullable + 1,
            item: max,
            definition: Vec::new(),
            repetition: Vec::new(),
            values: Vec::new(),
        })
    }

    /// Fills the levels for `rows` and returns their non-NULL floats: borrowed when every vector is whole.
    fn fill<'a>(&mut self, rows: &'a dyn Array) -> Result<Cow<'a, [f32]>, ColdError> {
        self.definition.clear();
        self.repetition.clear();
        self.values.clear();
        let not_floats = || ColdError::Corrupt(format!("a vector column holds {}", rows.data_type()));
        // Each row's span in the child array.
        let (items, spans): (&dyn Array, Vec<(usize, usize)>) = match rows.data_type() {
            DataType::FixedSizeList(_, n) => {
                let list = rows.as_fixed_size_list();
                let n = *n as usize;
                (list.values().as_ref(), (0..list.len()).map(|row| (list.value_offset_at(row), n)).collect())
            }
            DataType::List(_) => {
                let list = rows.as_list::<i32>();
                let spans = list.value_offsets().windows(2).map(|w| (w[0] as usize, (w[1] - w[0]) as usize));
                (list.values().as_ref(), spans.collect())
            }
            _ => return Err(not_floats()),
        };
        let floats = items.as_primitive_opt::<Float32Type>().ok_or_else(not_floats)?;
        let whole = rows.null_count() == 0 && floats.null_count() == 0;
        // Without NULLs the floats are used in place: a list's rows lie back to back in its child array.
        let (mut first, mut end) = (None, 0);
        for (row, &(start, len)) in spans.iter().enumerate() {
            if rows.is_null(row) || len == 0 {
                self.definition.push(if rows.is_null(row) { self.null_list } else { self.empty_list });
                self.repetition.push(0);
                continue;
            }
            if start + len > floats.len() {
                return Err(not_floats());
            }
            first.get_or_insert(start);
            end = start + len;
            self.repetition.push(0);
            self.repetition.extend(std::iter::repeat_n(1, len - 1));
            if whole {
                self.definition.extend(std::iter::repeat_n(self.item, len));
                continue;
            }
            for i in start..start + len {
                if floats.is_null(i) {
                    self.definition.push(self.null_item);
                } else {
                    self.definition.push(self.item);
                    self.values.push(floats.value(i));
                }
            }
        }
        if whole {
            return Ok(Cow::Borrowed(first.map_or(&[][..], |first| &floats.values()[first..end])));
        }
        Ok(Cow::Owned(std::mem::take(&mut self.values)))
    }
}

/// A page writer that compresses each data page itself: the levels, then each byte stream of the split floats,
/// every part ending a zstd block (see the module documentation).
struct SplitStreamPages<'a> {
    sink: &'a mut TrackedWrite<Vec<u8>>,
    zstd: zstd_safe::CCtx<'static>,
}

impl<'a> SplitStreamPages<'a> {
    fn new(sink: &'a mut TrackedWrite<Vec<u8>>) -> Result<Self, ColdError> {
        use zstd_safe::CParameter;
        let mut zstd = zstd_safe::CCtx::try_create().ok_or_else(|| ColdError::Corrupt("no zstd context".into()))?;
        for parameter in [CParameter::CompressionLevel(1), CParameter::HashLog(6), CParameter::MinMatch(7)] {
            zstd.set_parameter(parameter).map_err(zstd_error)?;
        }
        Ok(SplitStreamPages { sink, zstd })
    }

    /// One frame of `parts`, each ending a block.
    fn compress(&mut self, parts: &[&[u8]]) -> Result<Vec<u8>, ParquetError> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut out = Vec::with_capacity(zstd_safe::compress_bound(total) + 64 * parts.len());
        self.zstd.reset(zstd_safe::ResetDirective::SessionOnly).map_err(zstd_error)?;
        self.zstd.set_pledged_src_size(Some(total as u64)).map_err(zstd_error)?;
        let last = parts.len() - 1;
        for (i, part) in parts.iter().enumerate() {
            let directive = if i == last { ZSTD_EndDirective::ZSTD_e_end } else { ZSTD_EndDirective::ZSTD_e_flush };
            let mut input = zstd_safe::InBuffer::around(part);
            loop {
                if out.capacity() - out.len() < 4096 {
                    out.reserve(64 * 1024);
                }
                let written = out.len();
                let mut output = zstd_safe::OutBuffer::around_pos(&mut out, written);
                let pending = self.zstd.compress_stream2(&mut output, &mut input, directive).map_err(zstd_error)?;
                if pending == 0 && input.pos() == part.len() {
                    break;
                }
            }
        }
        Ok(out)
    }
}

impl PageWriter for SplitStreamPages<'_> {
    fn write_page(&mut self, page: CompressedPage) -> parquet::errors::Result<PageWriteSpec> {
        let uncompressed = page.uncompressed_size();
        let page = match page.compressed_page() {
            Page::DataPage { buf, num_values, encoding, def_level_encoding, rep_level_encoding, statistics } => {
                let parts = split(buf)?;
                let compressed = self.compress(&parts)?;
                let page = Page::DataPage {
                    buf: compressed.into(),
                    num_values: *num_values,
                    encoding: *encoding,
                    def_level_encoding: *def_level_encoding,
                    rep_level_encoding: *rep_level_encoding,
                    statistics: statistics.clone(),
                };
                CompressedPage::new(page, uncompressed)
            }
            other => {
                return Err(ParquetError::General(format!(
                    "a vector column wrote a {:?} page; only version 1 data pages are expected",
                    other.page_type()
                )));
            }
        };
        SerializedPageWriter::new(self.sink).write_page(page)
    }

    fn close(&mut self) -> parquet::errors::Result<()> {
        self.sink.flush()?;
        Ok(())
    }
}

/// The parts of an uncompressed version 1 page of split floats: its levels (repetition, then definition, each
/// after its 4-byte length), then the four byte streams.
fn split(page: &[u8]) -> Result<Vec<&[u8]>, ParquetError> {
    let malformed = || ParquetError::General(format!("a vector page of {} bytes is not levels and floats", page.len()));
    let length = |at: usize| -> Result<usize, ParquetError> {
        let bytes = page.get(at..at + 4).ok_or_else(malformed)?;
        Ok(u32::from_le_bytes(bytes.try_into().map_err(|_| malformed())?) as usize)
    };
    let repetition = length(0)?;
    let definition = length(4 + repetition)?;
    let levels = 8 + repetition + definition;
    let values = page.get(levels..).ok_or_else(malformed)?;
    if values.len() % 4 != 0 {
        return Err(malformed());
    }
    let stream = values.len() / 4;
    let mut parts = vec![&page[..levels]];
    parts.extend(values.chunks(stream.max(1)).filter(|s| !s.is_empty()));
    Ok(parts)
}

fn zstd_error(code: usize) -> ParquetError {
    ParquetError::General(format!("zstd: {}", zstd_safe::get_error_name(code)))
}

#[cfg(test)]
mod tests {
    use super::super::write::{layout, write_verified};
    use super::*;
    use arrow::array::{ArrayRef, FixedSizeListArray, Float32Array, ListArray, RecordBatch, TimestampMicrosecondArray};
    use arrow::buffer::{NullBuffer, OffsetBuffer};
    use arrow::datatypes::{Field, Schema, TimeUnit};
    use parquet::file::reader::{FileReader, SerializedFileReader};

    /// `rows` unit vectors of `dim` floats distributed like a sentence embedding's components (near normal, so
    /// their mantissa bits are noise and their exponents cluster).
    fn embeddings(rows: usize, dim: usize) -> Vec<f32> {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut uniform = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let mut out = Vec::with_capacity(rows * dim);
        for _ in 0..rows {
            let v: Vec<f32> = (0..dim).map(|_| (0..4).map(|_| uniform()).sum()).collect();
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            out.extend(v.iter().map(|x| x / norm));
        }
        out
    }

    fn object(vectors: ArrayRef) -> (Arc<Schema>, RecordBatch) {
        let schema = Arc::new(Schema::new(vec![
            Field::new("ts", DataType::Timestamp(TimeUnit::Microsecond, None), true),
            Field::new("embedding", vectors.data_type().clone(), true),
        ]));
        let ts = TimestampMicrosecondArray::from((0..vectors.len() as i64).collect::<Vec<_>>());
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(ts), vectors]).unwrap();
        (schema, batch)
    }

    fn fixed(rows: usize, dim: usize) -> ArrayRef {
        let item = Arc::new(Field::new("element", DataType::Float32, true));
        Arc::new(FixedSizeListArray::new(item, dim as i32, Arc::new(Float32Array::from(embeddings(rows, dim))), None))
    }

    #[test]
    fn each_byte_stream_is_coded_with_a_table_of_its_own() {
        // 40 vectors: a page smaller than one zstd block, the case where one call codes all four streams alike.
        let (schema, batch) = object(fixed(40, 384));
        let ours = write_verified(&schema, std::slice::from_ref(&batch), &layout(&schema, 1000).unwrap()).unwrap();
        // The same column as parquet's writer compresses it: the page in one zstd call at level 1.
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).unwrap()))
            .set_dictionary_enabled(false)
            .set_encoding(Encoding::BYTE_STREAM_SPLIT)
            .build();
        let mut plain = Vec::new();
        let mut writer = parquet::arrow::ArrowWriter::try_new(&mut plain, schema.clone(), Some(props)).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        let chunk = |bytes: bytes::Bytes| {
            let reader = SerializedFileReader::new(bytes).unwrap();
            let size = reader.metadata().row_group(0).column(1).compressed_size();
            let mut pages = reader.get_row_group(0).unwrap().get_column_page_reader(1).unwrap();
            (size, pages.get_next_page().unwrap().unwrap().page_type())
        };
        let ((ours, page), (theirs, _)) = (chunk(ours.bytes), chunk(bytes::Bytes::from(plain)));
        assert_eq!(page, parquet::basic::PageType::DATA_PAGE, "a version 1 page: its levels compressed too");
        // Mantissa bytes stay at 8 bits, exponent bytes drop to about 3: ~1,290 B per vector against ~1,420.
        assert!(ours * 100 < theirs * 93, "{ours} B against {theirs} B");
        assert!(ours < 40 * 1_300, "{ours} B for 40 vectors");
    }

    #[test]
    fn vectors_with_nulls_and_of_any_length_read_back_as_written() {
        // Lists: NULL elements, a NULL vector, an empty one, and a slice that starts mid-array.
        let item = Arc::new(Field::new("element", DataType::Float32, true));
        let values = Float32Array::from(vec![Some(1.0), None, Some(3.0), Some(4.0), Some(5.0), Some(-0.0), Some(7.5)]);
        let offsets = OffsetBuffer::new(vec![0, 3, 3, 3, 5, 7].into());
        let nulls = NullBuffer::from(vec![true, false, true, true, true]);
        let lists = ListArray::new(item.clone(), offsets, Arc::new(values), Some(nulls));
        for vectors in [Arc::new(lists.clone()) as ArrayRef, Arc::new(lists.slice(1, 4)), Arc::new(lists.slice(3, 2))] {
            let (schema, batch) = object(vectors);
            let written = write_verified(&schema, &[batch], &layout(&schema, 2).unwrap()).unwrap();
            assert!(written.rows > 0);
        }
        // Fixed-size vectors: a NULL one, a NULL element, and whole ones across several pages and row groups.
        let floats = embeddings(3000, 8);
        let mut values: Vec<Option<f32>> = floats.into_iter().map(Some).collect();
        values[9] = None;
        let nulls = NullBuffer::from((0..3000).map(|row| row != 2).collect::<Vec<_>>());
        let vectors = FixedSizeListArray::new(item, 8, Arc::new(Float32Array::from(values)), Some(nulls));
        let (schema, batch) = object(Arc::new(vectors));
        let batches = [batch.slice(0, 1500), batch.slice(1500, 1500)];
        let written = write_verified(&schema, &batches, &layout(&schema, 1000).unwrap()).unwrap();
        assert_eq!(written.rows, 3000);
        // Whole vectors only (floats used in place).
        let (schema, batch) = object(fixed(2500, 384));
        let written = write_verified(&schema, &[batch.slice(7, 2493)], &layout(&schema, 100_000).unwrap()).unwrap();
        assert_eq!(written.rows, 2493);
    }

    #[test]
    fn duckdb_reads_the_vectors_as_written() {
        let (schema, batch) = object(fixed(700, 384));
        let written = write_verified(&schema, std::slice::from_ref(&batch), &layout(&schema, 1000).unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("part.parquet");
        std::fs::write(&path, &written.bytes).unwrap();
        let db = duckdb::Connection::open_in_memory().unwrap();
        let expected = embeddings(700, 384);
        let sql = format!("SELECT count(*), min(len(embedding)) FROM read_parquet('{}')", path.display());
        let counts: (i64, i64) = db.query_row(&sql, [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        assert_eq!(counts, (700, 384));
        let bits: Vec<u32> = db
            .prepare(&format!("SELECT unnest(embedding) FROM read_parquet('{}') ORDER BY ts", path.display()))
            .unwrap()
            .query_map([], |r| r.get::<_, f32>(0))
            .unwrap()
            .map(|v| v.unwrap().to_bits())
            .collect();
        assert_eq!(bits, expected.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "bit for bit");
    }

    #[test]
    fn a_page_that_is_not_levels_and_floats_is_refused() {
        assert!(split(&[1, 0]).is_err(), "too short for a length");
        assert!(split(&[9, 0, 0, 0, 1, 2]).is_err(), "levels longer than the page");
        let page = [1u8, 0, 0, 0, 7, 1, 0, 0, 0, 3, 1, 2, 3, 4, 5, 6, 7, 8];
        let parts = split(&page).unwrap();
        assert_eq!(parts, [&page[..10], &[1, 2][..], &[3, 4][..], &[5, 6][..], &[7, 8][..]]);
        assert!(split(&page[..17]).is_err(), "7 bytes of floats");
    }
}
