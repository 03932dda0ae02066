//! Writing one cold object: Arrow batches (as DuckDB hands them over) into a Parquet file, read back and compared
//! before anything else sees it.
//!
//! DuckDB's own `COPY … (FORMAT parquet)` wrote the 384 floats of an embedding as a LIST with a repetition level
//! per element on one core, at 40–70k rows/s on this class of machine — below the move's target on its own
//! (BENCHMARKS.md). arrow-rs writes the same LIST column from a fixed-size list's flat buffer, and a move runs one
//! writer per core.
//!
//! Layout choices (documented for readers in `docs/STORAGE.md`):
//! - zstd on the columns with the bytes (vectors at level 1, text, keys and tags at level 3, see [`COMPRESSED`]);
//!   the others (mostly NULL, or short labels as dictionary indexes) are
//!   left uncompressed: zstd would gain a few bytes per object and cost a compression context per page, which
//!   with its allocation was a tenth of a move's CPU;
//! - the embedding's floats byte-stream-split, without dictionary or statistics (neither helps a vector);
//! - free text without dictionary (rarely repeats) as DELTA_LENGTH_BYTE_ARRAY, the short labels with one;
//! - chunk and page statistics elsewhere, so that readers prune row groups by time, system or project;
//! - the sort order (`ts`, `id`) recorded in the row groups' metadata.

use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit, TimestampMicrosecondType};
use parquet::arrow::ArrowSchemaConverter;
use parquet::arrow::arrow_reader::{ArrowReaderOptions, ParquetRecordBatchReaderBuilder};
use parquet::arrow::arrow_writer::{ArrowRowGroupWriterFactory, compute_leaves};
use parquet::basic::{Compression, Encoding, Type as PhysicalType, ZstdLevel};
use parquet::file::metadata::{ColumnChunkMetaData, SortingColumn};
use parquet::file::properties::{EnabledStatistics, WriterProperties, WriterVersion};
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::types::ColumnPath;
use sha2::{Digest, Sha256};

use super::cache::hex;
use super::{ColdError, vector_chunk};

/// Rows decoded at a time when an object is read back.
const READ_BACK_ROWS: usize = 8192;

/// Columns worth compressing (see the module documentation), with their zstd level.
const COMPRESSED: &[(&str, i32)] = &[
    ("embedding", VECTOR_LEVEL),
    ("embedding_i8", VECTOR_LEVEL),
    ("text", TEXT_LEVEL),
    ("metadata", TEXT_LEVEL),
    ("name", TEXT_LEVEL),
    ("id", TEXT_LEVEL),
    ("tags", TEXT_LEVEL),
];

/// Vectors: half their bytes are mantissa noise that no match finder shrinks, and the exponent bytes are coded
/// best by level 1 among the fast levels (levels 2–9 give 4–10 B more per 384-float vector).
const VECTOR_LEVEL: i32 = 1;

/// Text: level 3 (zstd's default) takes 8 % off real prose and code (768 B of it per record: 199 → 184 B) at
/// about level 1's speed on these page sizes; levels above 4 cost several times the CPU for a few more bytes.
const TEXT_LEVEL: i32 = 3;

/// Columns whose values rarely repeat (free text, keys, times, fingerprints): a dictionary would hold nearly every
/// value once, so they go straight to their format-version-2 encodings (delta for times and keys).
const NO_DICTIONARY: &[&str] = &["text", "metadata", "name", "id", "ts", "ingested_at", "embedding_hash"];

/// Free text: its lengths delta-coded and its bytes back to back. DELTA_BYTE_ARRAY (format version 2's default
/// for strings) also strips each value's prefix shared with the one before, which free text next to free text
/// hardly has, and its decoder rebuilds every value from two parts when the object is verified.
const FREE_TEXT: &[&str] = &["text", "metadata", "name"];

/// Free text without statistics: the first and last of some texts prune nothing a text search asks for, and
/// cost up to 256 B per object (64 B bounds, in the footer and in the page index).
const NO_STATISTICS: &[&str] = &["text", "metadata"];

/// One Parquet file in memory, checked against the rows it was written from.
pub(crate) struct Written {
    pub(crate) bytes: bytes::Bytes,
    pub(crate) sha256: String,
    pub(crate) rows: u64,
    /// Smallest and largest `ts`, µs since the epoch.
    pub(crate) min_ts: i64,
    pub(crate) max_ts: i64,
}

/// The schema objects are written with: `exported` (the stored columns as DuckDB exports them) with every list's
/// item named `element`, as the Parquet format's LIST layout names it (DuckDB names it `l`, or nothing for an
/// array), so that every object has the same column paths whichever way its lists were built.
pub(crate) fn object_schema(exported: &Schema) -> Schema {
    let fields: Vec<Field> = exported
        .fields()
        .iter()
        .map(|f| {
            let data_type = match f.data_type() {
                DataType::List(item) => DataType::List(Arc::new(element(item))),
                DataType::FixedSizeList(item, n) => DataType::FixedSizeList(Arc::new(element(item)), *n),
                other => other.clone(),
            };
            Field::new(f.name(), data_type, f.is_nullable())
        })
        .collect();
    Schema::new(fields)
}

fn element(item: &Field) -> Field {
    Field::new("element", item.data_type().clone(), item.is_nullable())
}

/// `exported` with `embedding_i8` typed as stored (`TINYINT[n]`): an int8 export hands over the floats in that
/// column and [`quantize`] turns them into int8 here, where it costs a fraction of DuckDB's per-element lambdas.
pub(crate) fn quantized_schema(exported: &Schema) -> Result<Schema, ColdError> {
    let index = exported.index_of("embedding_i8")?;
    let mut fields: Vec<Field> = exported.fields().iter().map(|f| f.as_ref().clone()).collect();
    let DataType::FixedSizeList(_, n) = fields[index].data_type() else {
        return Err(ColdError::Corrupt(format!("the export's embedding_i8 is {}", fields[index].data_type())));
    };
    let data_type = DataType::FixedSizeList(Arc::new(Field::new("element", DataType::Int8, true)), *n);
    fields[index] = Field::new("embedding_i8", data_type, true);
    Ok(Schema::new(fields))
}

/// `batch` (with the floats in `embedding_i8`) quantized to `schema` (see [`quantized_schema`]): per vector
/// `embedding_scale = max |x|` and `embedding_i8 = round(x / scale · 127)`, rounding half away from zero; a zero
/// vector gives zeros and scale 0, a NULL vector NULL in both.
pub(crate) fn quantize(batch: &RecordBatch, schema: &Arc<Schema>) -> Result<RecordBatch, ColdError> {
    use arrow::array::{FixedSizeListArray, Float32Array, Int8Array};
    use arrow::datatypes::Float32Type;
    let (vectors, scales) = (schema.index_of("embedding_i8")?, schema.index_of("embedding_scale")?);
    let unexpected = || ColdError::Corrupt("the export's embedding_i8 does not hold FLOAT vectors".into());
    let floats = batch.column(vectors).as_fixed_size_list_opt().ok_or_else(unexpected)?;
    let values = floats.values().as_primitive_opt::<Float32Type>().ok_or_else(unexpected)?.values();
    let dim = floats.value_length() as usize;
    let mut quantized = vec![0i8; floats.len() * dim];
    let mut scale = Vec::with_capacity(floats.len());
    for (row, out) in quantized.chunks_exact_mut(dim.max(1)).enumerate().take(floats.len()) {
        if floats.is_null(row) {
            scale.push(None);
            continue;
        }
        let start = floats.value_offset_at(row);
        let vector = values.get(start..start + dim).ok_or_else(unexpected)?;
        let max = vector.iter().fold(0f32, |m, x| m.max(x.abs()));
        if max > 0.0 {
            for (q, x) in out.iter_mut().zip(vector) {
                *q = (x / max * 127.0).round() as i8;
            }
        }
        scale.push(Some(max));
    }
    let DataType::FixedSizeList(item, _) = schema.field(vectors).data_type() else { return Err(unexpected()) };
    let int8 = FixedSizeListArray::try_new(
        item.clone(),
        dim as i32,
        Arc::new(Int8Array::from(quantized)),
        floats.nulls().cloned(),
    )?;
    let mut columns = batch.columns().to_vec();
    columns[vectors] = Arc::new(int8);
    columns[scales] = Arc::new(Float32Array::from(scale));
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

/// `batch` with the types of `schema` (see [`object_schema`]: only names inside lists differ, no value changes).
pub(crate) fn conform(batch: &RecordBatch, schema: &Arc<Schema>) -> Result<RecordBatch, ColdError> {
    let columns = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(column, field)| {
            if column.data_type() == field.data_type() {
                Ok(column.clone())
            } else {
                arrow::compute::cast(column, field.data_type())
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

/// How objects with one schema are written: the file's writer settings, and the vector columns', which are
/// encoded apart (see [`vector_chunk`]).
pub(crate) struct Layout {
    /// Objects of more than [`SINGLE_PAGE_ROWS`] rows: with page statistics and the page index.
    large: Arc<WriterProperties>,
    /// Smaller objects: chunk statistics only.
    small: Arc<WriterProperties>,
    vectors: Arc<WriterProperties>,
    row_group_rows: usize,
}

/// Objects up to this many rows hold one page per column but the vectors and long text (parquet's page row
/// limit), where a page index would repeat the chunk statistics: 1 KB per object, 2 B per row of a 500-row one.
const SINGLE_PAGE_ROWS: usize = parquet::file::properties::DEFAULT_DATA_PAGE_ROW_COUNT_LIMIT;

impl Layout {
    fn file(&self, rows: usize) -> &Arc<WriterProperties> {
        if rows > SINGLE_PAGE_ROWS { &self.large } else { &self.small }
    }
}

/// The layout of objects with `schema` (the stored columns as DuckDB exports them).
pub(crate) fn layout(schema: &Schema, row_group_rows: usize) -> Result<Layout, ColdError> {
    let descriptor = ArrowSchemaConverter::new().convert(schema)?;
    let mut builder = WriterProperties::builder()
        .set_writer_version(WriterVersion::PARQUET_2_0)
        .set_compression(Compression::UNCOMPRESSED)
        .set_max_row_group_row_count(Some(row_group_rows.max(1)))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_created_by(format!("akosha-aggregator {} (parquet-rs)", env!("CARGO_PKG_VERSION")));
    let mut sorting = Vec::new();
    for (leaf, column) in descriptor.columns().iter().enumerate() {
        let path = column.path().clone();
        let top = path.parts()[0].clone();
        let top = top.as_str();
        let is_float = matches!(column.physical_type(), PhysicalType::FLOAT | PhysicalType::DOUBLE);
        if let Some((_, level)) = COMPRESSED.iter().find(|(name, _)| *name == top) {
            builder = builder.set_column_compression(path.clone(), Compression::ZSTD(ZstdLevel::try_new(*level)?));
        }
        if top.starts_with("embedding") && is_float && column.max_rep_level() > 0 {
            // DOUBLE vectors; FLOAT ones are written by `vector_chunk` with its own settings.
            builder = vector_column(builder, path.clone());
        } else if NO_DICTIONARY.contains(&top) {
            builder = builder.set_column_dictionary_enabled(path.clone(), false);
            if FREE_TEXT.contains(&top) {
                builder = builder.set_column_encoding(path.clone(), Encoding::DELTA_LENGTH_BYTE_ARRAY);
            }
        }
        if NO_STATISTICS.contains(&top) {
            builder = builder.set_column_statistics_enabled(path, EnabledStatistics::None);
        }
        if matches!(top, "ts" | "id") && column.max_rep_level() == 0 {
            sorting
                .push((top == "id", SortingColumn { column_idx: leaf as i32, descending: false, nulls_first: false }));
        }
    }
    // `ts` first, then `id`.
    sorting.sort_by_key(|(second, _)| *second);
    let sorting: Vec<SortingColumn> = sorting.into_iter().map(|(_, c)| c).collect();
    let large = builder.set_sorting_columns((!sorting.is_empty()).then_some(sorting)).build();
    let small =
        large.clone().into_builder().set_statistics_enabled(EnabledStatistics::Chunk).set_offset_index_disabled(true);
    Ok(Layout {
        large: Arc::new(large),
        small: Arc::new(small.build()),
        vectors: vector_chunk::vector_properties(),
        row_group_rows: row_group_rows.max(1),
    })
}

fn vector_column(
    builder: parquet::file::properties::WriterPropertiesBuilder,
    path: ColumnPath,
) -> parquet::file::properties::WriterPropertiesBuilder {
    builder
        .set_column_dictionary_enabled(path.clone(), false)
        .set_column_encoding(path.clone(), Encoding::BYTE_STREAM_SPLIT)
        .set_column_statistics_enabled(path, EnabledStatistics::None)
}

/// Writes `batches` (all with `schema`) as one Parquet file, reads it back and compares every column with what
/// was written: the bytes that go to the store decode to exactly these rows, or this fails.
///
/// The file carries no Arrow schema in its metadata (1.7 KB an object, more than a small object's rows cost):
/// its Parquet schema says everything a reader needs, and this crate reads objects with `schema` given.
pub(crate) fn write_verified(
    schema: &Arc<Schema>,
    batches: &[RecordBatch],
    layout: &Layout,
) -> Result<Written, ColdError> {
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    // The encoded object is at most about as large as the rows in memory (zstd and the encodings only shrink).
    let in_memory: usize = batches.iter().map(RecordBatch::get_array_memory_size).sum();
    let mut buffer = Vec::with_capacity(in_memory.min(1 << 30) + 64 * 1024);
    let parquet_schema = ArrowSchemaConverter::new().convert(schema)?;
    let properties = for_rows(layout.file(rows), schema, &parquet_schema, batches)?;
    let mut writer = SerializedFileWriter::new(&mut buffer, parquet_schema.root_schema_ptr(), properties)?;
    let factory = ArrowRowGroupWriterFactory::new(&writer, schema.clone());
    // Each leaf column's field, and whether it is a vector written by `vector_chunk`.
    let leaves: Vec<(usize, bool)> = parquet_schema
        .columns()
        .iter()
        .map(|column| {
            let field = schema.index_of(&column.path().parts()[0])?;
            Ok((field, vector_chunk::is_vector(schema.field(field).data_type(), column)))
        })
        .collect::<Result<_, ColdError>>()?;
    for (index, group) in row_groups(batches, layout.row_group_rows).iter().enumerate() {
        let mut columns = factory.create_column_writers(index)?;
        for batch in group {
            let mut leaf = 0;
            for (position, (field, column)) in schema.fields().iter().zip(batch.columns()).enumerate() {
                // A vector is one leaf, written apart below.
                if leaves.get(leaf).is_some_and(|&(of, vector)| of == position && vector) {
                    leaf += 1;
                    continue;
                }
                for encoded in compute_leaves(field, column)? {
                    columns[leaf].write(&encoded)?;
                    leaf += 1;
                }
            }
        }
        let mut row_group = writer.next_row_group()?;
        for (leaf, column) in columns.into_iter().enumerate() {
            let (field, vector) = leaves[leaf];
            if vector {
                let arrays: Vec<&dyn Array> = group.iter().map(|b| b.column(field).as_ref()).collect();
                let (bytes, mut close) =
                    vector_chunk::write_chunk(parquet_schema.column(leaf), &layout.vectors, &arrays)?;
                close.metadata = lean(close.metadata)?;
                row_group.append_column(&bytes, close)?;
            } else {
                let mut chunk = column.close()?;
                chunk.close_mut().metadata = lean(chunk.close().metadata.clone())?;
                chunk.append_to_row_group(&mut row_group)?;
            }
        }
        row_group.close()?;
    }
    writer.close()?;
    let bytes = bytes::Bytes::from(buffer);
    let (min_ts, max_ts) = verify(schema, batches, &bytes)?;
    Ok(Written { sha256: hex(&Sha256::digest(&bytes)), bytes, rows: rows as u64, min_ts, max_ts })
}

/// `properties` for the rows of `batches`: the columns NULL in every row (about half of them in an object of one
/// kind) without a dictionary, whose empty page with its offset and encodings in the footer is ~20 B per column
/// and object, and uncompressed, so that no zstd context is set up (and torn down) for a page of levels.
fn for_rows(
    properties: &Arc<WriterProperties>,
    schema: &Schema,
    parquet_schema: &parquet::schema::types::SchemaDescriptor,
    batches: &[RecordBatch],
) -> Result<Arc<WriterProperties>, ColdError> {
    let mut empty = Vec::new();
    for column in parquet_schema.columns() {
        let field = schema.index_of(&column.path().parts()[0])?;
        if batches.iter().all(|b| b.column(field).null_count() == b.num_rows()) {
            empty.push(column.path().clone());
        }
    }
    if empty.is_empty() {
        return Ok(properties.clone());
    }
    let builder = empty.into_iter().fold(properties.as_ref().clone().into_builder(), |b, path| {
        b.set_column_dictionary_enabled(path.clone(), false).set_column_compression(path, Compression::UNCOMPRESSED)
    });
    Ok(Arc::new(builder.build()))
}

/// `metadata` without its optional page encoding and size statistics (which encodings each page used, level
/// histograms, bytes of strings before encoding): hints some engines use to plan, none to read, and 470 B of a
/// 22-column object's 2.4 KB footer.
fn lean(metadata: ColumnChunkMetaData) -> Result<ColumnChunkMetaData, ColdError> {
    Ok(metadata
        .into_builder()
        .clear_page_encoding_stats()
        .set_unencoded_byte_array_data_bytes(None)
        .set_repetition_level_histogram(None)
        .set_definition_level_histogram(None)
        .build()?)
}

/// `batches` cut into row groups of `rows_per_group` rows (the last may hold fewer), slices, nothing copied.
fn row_groups(batches: &[RecordBatch], rows_per_group: usize) -> Vec<Vec<RecordBatch>> {
    let mut groups = Vec::new();
    let mut group: Vec<RecordBatch> = Vec::new();
    let mut in_group = 0;
    for batch in batches {
        let mut offset = 0;
        while offset < batch.num_rows() {
            let n = (rows_per_group - in_group).min(batch.num_rows() - offset);
            group.push(batch.slice(offset, n));
            (offset, in_group) = (offset + n, in_group + n);
            if in_group == rows_per_group {
                groups.push(std::mem::take(&mut group));
                in_group = 0;
            }
        }
    }
    if in_group > 0 {
        groups.push(group);
    }
    groups
}

/// Decodes `bytes` and compares every row with `batches`; returns their `ts` range.
fn verify(schema: &Arc<Schema>, batches: &[RecordBatch], bytes: &bytes::Bytes) -> Result<(i64, i64), ColdError> {
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    // Compared window by window (both sides sliced, nothing copied): the object is decoded a few thousand rows
    // at a time and each window checked against the same rows of the batches it was written from.
    let options = ArrowReaderOptions::new().with_schema(schema.clone());
    let reader = ParquetRecordBatchReaderBuilder::try_new_with_options(bytes.clone(), options)?
        .with_batch_size(READ_BACK_ROWS)
        .build()?;
    let mut written = batches.iter().filter(|b| b.num_rows() > 0).cloned();
    let mut current: Option<RecordBatch> = None;
    let mut compared = 0;
    for back in reader {
        let back = back?;
        let mut offset = 0;
        while offset < back.num_rows() {
            let pending = match current.take().filter(|c| c.num_rows() > 0) {
                Some(pending) => pending,
                None => written.next().ok_or_else(|| {
                    ColdError::Corrupt(format!("a written Parquet object reads back more than the {rows} rows written"))
                })?,
            };
            let n = pending.num_rows().min(back.num_rows() - offset);
            for (i, field) in schema.fields().iter().enumerate() {
                if pending.column(i).slice(0, n).to_data() != back.column(i).slice(offset, n).to_data() {
                    return Err(ColdError::Corrupt(format!(
                        "column {} of a written Parquet object does not read back as written (rows {}..{})",
                        field.name(),
                        compared,
                        compared + n
                    )));
                }
            }
            current = Some(pending.slice(n, pending.num_rows() - n));
            offset += n;
            compared += n;
        }
    }
    if compared != rows {
        return Err(ColdError::Corrupt(format!(
            "a written Parquet object reads back {compared} rows, {rows} were written"
        )));
    }
    let mut range: Option<(i64, i64)> = None;
    for batch in batches.iter().filter(|b| b.num_rows() > 0) {
        let (min, max) = ts_range(batch)?;
        range = Some(range.map_or((min, max), |(lo, hi)| (lo.min(min), hi.max(max))));
    }
    Ok(range.unwrap_or((0, 0)))
}

/// The smallest and largest `ts` of `batch` (µs; `(0, 0)` without rows).
fn ts_range(batch: &RecordBatch) -> Result<(i64, i64), ColdError> {
    let column = batch.column_by_name("ts").ok_or_else(|| ColdError::Corrupt("a cold object has no ts".into()))?;
    if column.data_type() != &DataType::Timestamp(TimeUnit::Microsecond, None) {
        return Err(ColdError::Corrupt(format!("a cold object's ts is {}, not TIMESTAMP", column.data_type())));
    }
    let ts = column.as_primitive::<TimestampMicrosecondType>();
    let min = arrow::compute::min(ts).unwrap_or(0);
    let max = arrow::compute::max(ts).unwrap_or(0);
    Ok((min, max))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{FixedSizeListArray, Float32Array, StringArray, TimestampMicrosecondArray};

    #[test]
    fn quantizing_scales_each_vector_by_its_largest_magnitude() {
        let item = Arc::new(Field::new("l", DataType::Float32, true));
        let exported = Schema::new(vec![
            Field::new("embedding_i8", DataType::FixedSizeList(item.clone(), 3), true),
            Field::new("embedding_scale", DataType::Float32, true),
        ]);
        let schema = Arc::new(quantized_schema(&exported).unwrap());
        let floats = Float32Array::from(vec![0.5, -0.25, 0.001, 0.0, 0.0, 0.0, 9.0, 9.0, 9.0, -0.2, 0.1, 0.05]);
        let nulls = arrow::buffer::NullBuffer::from(vec![true, true, false, true]);
        let vectors = FixedSizeListArray::try_new(item, 3, Arc::new(floats), Some(nulls)).unwrap();
        let exported = RecordBatch::try_new(
            Arc::new(exported),
            vec![Arc::new(vectors), Arc::new(Float32Array::from(vec![None::<f32>; 4]))],
        )
        .unwrap();
        // Sliced, as the export's batches are cut into objects.
        let quantized = quantize(&exported.slice(1, 3), &schema).unwrap();
        let first = quantize(&exported.slice(0, 1), &schema).unwrap();
        let quantized = arrow::compute::concat_batches(&schema, &[first, quantized]).unwrap();
        let scale = quantized.column(1).as_primitive::<arrow::datatypes::Float32Type>();
        assert_eq!(scale.iter().collect::<Vec<_>>(), [Some(0.5), Some(0.0), None, Some(0.2)]);
        let int8 = quantized.column(0).as_fixed_size_list();
        let row = |i: usize| int8.value(i).as_primitive::<arrow::datatypes::Int8Type>().values().to_vec();
        // 127 · 0.001 / 0.5 = 0.254 rounds to 0; −0.25 / 0.5 · 127 = −63.5 rounds away from zero.
        assert_eq!(row(0), [127, -64, 0]);
        assert_eq!(row(1), [0, 0, 0], "a zero vector stays zero");
        assert!(int8.is_null(2));
        assert_eq!(row(3), [-127, 64, 32]);
    }

    fn batch(rows: usize, offset: i64) -> (Arc<Schema>, RecordBatch) {
        let item = Arc::new(Field::new("item", DataType::Float32, true));
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, true),
            Field::new("ts", DataType::Timestamp(TimeUnit::Microsecond, None), true),
            Field::new("text", DataType::Utf8, true),
            Field::new("embedding", DataType::FixedSizeList(item.clone(), 4), true),
        ]));
        let ids = StringArray::from((0..rows).map(|i| format!("r{i}")).collect::<Vec<_>>());
        let ts = TimestampMicrosecondArray::from((0..rows as i64).map(|i| offset + i * 10).collect::<Vec<_>>());
        let text = StringArray::from((0..rows).map(|i| Some(format!("words {i}"))).collect::<Vec<_>>());
        let floats = Float32Array::from((0..rows * 4).map(|i| i as f32 / 7.0).collect::<Vec<_>>());
        let vectors = FixedSizeListArray::new(item, 4, Arc::new(floats), None);
        let batch =
            RecordBatch::try_new(schema.clone(), vec![Arc::new(ids), Arc::new(ts), Arc::new(text), Arc::new(vectors)])
                .unwrap();
        (schema, batch)
    }

    #[test]
    fn an_object_reads_back_as_its_rows_with_their_time_range() {
        let (exported, first) = batch(1000, 5_000);
        let (_, second) = batch(10, 1_000);
        let schema = Arc::new(object_schema(&exported));
        let (first, second) = (conform(&first, &schema).unwrap(), conform(&second, &schema).unwrap());
        let layout = layout(&schema, 300).unwrap();
        let written = write_verified(&schema, &[first, second], &layout).unwrap();
        assert_eq!(written.rows, 1010);
        assert_eq!((written.min_ts, written.max_ts), (1_000, 5_000 + 999 * 10));
        assert_eq!(written.sha256, hex(&Sha256::digest(&written.bytes)));
        let reader = ParquetRecordBatchReaderBuilder::try_new(written.bytes.clone()).unwrap();
        let metadata = reader.metadata().clone();
        assert_eq!(metadata.num_row_groups(), 4, "row groups of at most 300 rows");
        assert_eq!(metadata.row_groups().iter().map(|g| g.num_rows()).sum::<i64>(), 1010);
        assert!(metadata.file_metadata().key_value_metadata().is_none(), "no Arrow schema in the footer");
        // Without the schema given, a reader sees the vectors as lists of floats, the same floats.
        let back = reader.build().unwrap().next().unwrap().unwrap();
        let vectors = back.column_by_name("embedding").unwrap().as_list::<i32>();
        assert_eq!(
            vectors.value(1).as_primitive::<arrow::datatypes::Float32Type>().values(),
            &[4.0 / 7.0, 5.0 / 7.0, 6.0 / 7.0, 1.0]
        );
        let group = metadata.row_group(0);
        let sorting = group.sorting_columns().unwrap();
        assert_eq!(sorting[0].column_idx, 1, "sorted by ts first");
        let vector = group.column(3);
        assert_eq!(vector.column_path().string(), "embedding.list.element");
        assert!(
            vector.encodings().any(|e| e == Encoding::BYTE_STREAM_SPLIT),
            "{:?}",
            vector.encodings().collect::<Vec<_>>()
        );
        assert!(vector.statistics().is_none());
        assert!(group.column(1).statistics().is_some(), "ts keeps statistics for pruning");
        assert!(group.column(2).statistics().is_none(), "free text has none");
        // Free text without prefix coding, sorted keys with it; text and keys at zstd 3, vectors in zstd frames
        // of their own making.
        let (id, text) = (group.column(0), group.column(2));
        assert!(
            text.encodings().any(|e| e == Encoding::DELTA_LENGTH_BYTE_ARRAY),
            "{:?}",
            text.encodings().collect::<Vec<_>>()
        );
        assert!(id.encodings().any(|e| e == Encoding::DELTA_BYTE_ARRAY), "{:?}", id.encodings().collect::<Vec<_>>());
        let zstd = |level| Compression::ZSTD(ZstdLevel::try_new(level).unwrap());
        // (A footer names the codec, not its level: the levels are the writer's settings.)
        let level = |c: &parquet::file::metadata::ColumnChunkMetaData| layout.small.compression(c.column_path());
        assert_eq!((level(text), level(id)), (zstd(3), zstd(3)));
        assert!(matches!(vector.compression(), Compression::ZSTD(_)), "{:?}", vector.compression());
        assert!(matches!(text.compression(), Compression::ZSTD(_)), "{:?}", text.compression());
        assert_eq!(group.column(1).compression(), Compression::UNCOMPRESSED);
    }

    #[test]
    fn only_objects_with_pages_to_skip_carry_a_page_index() {
        for (rows, indexed) in [(SINGLE_PAGE_ROWS, false), (SINGLE_PAGE_ROWS + 1, true)] {
            let (exported, rows_batch) = batch(rows, 0);
            let schema = Arc::new(object_schema(&exported));
            let rows_batch = conform(&rows_batch, &schema).unwrap();
            let written = write_verified(&schema, &[rows_batch], &layout(&schema, 1_000_000).unwrap()).unwrap();
            let reader = ParquetRecordBatchReaderBuilder::try_new(written.bytes).unwrap();
            let metadata = reader.metadata();
            let ts = metadata.row_group(0).column(1);
            // `ts`: two pages past parquet's page row limit, then indexed.
            assert_eq!(ts.offset_index_offset().is_some(), indexed, "{rows} rows");
            assert_eq!(ts.column_index_offset().is_some(), indexed, "{rows} rows");
            assert!(metadata.row_group(0).column(1).statistics().is_some(), "{rows} rows: chunk statistics kept");
        }
    }

    #[test]
    fn bytes_that_do_not_decode_to_the_rows_are_refused() {
        let (exported, rows) = batch(100, 0);
        let schema = Arc::new(object_schema(&exported));
        let rows = conform(&rows, &schema).unwrap();
        let layout = layout(&schema, 1000).unwrap();
        let written = write_verified(&schema, std::slice::from_ref(&rows), &layout).unwrap();
        // Other rows than those written: the first differing column is named.
        let (_, other) = batch(100, 1);
        let other = conform(&other, &schema).unwrap();
        let err = verify(&schema, &[other], &written.bytes).unwrap_err().to_string();
        assert!(err.contains("column ts") && err.contains("rows 0..100"), "{err}");
        // Fewer or more rows than written.
        let err = verify(&schema, &[rows.slice(0, 60)], &written.bytes).unwrap_err().to_string();
        assert!(err.contains("more than the 60 rows"), "{err}");
        let err = verify(&schema, &[rows.clone(), rows.slice(0, 1)], &written.bytes).unwrap_err().to_string();
        assert!(err.contains("reads back 100 rows, 101 were written"), "{err}");
        // Bytes that are not Parquet at all.
        assert!(verify(&schema, &[rows], &bytes::Bytes::from_static(b"not parquet")).is_err());
    }

    #[test]
    fn an_empty_object_has_no_time_range() {
        let (schema, batch) = batch(0, 0);
        let layout = layout(&schema, 100).unwrap();
        let written = write_verified(&schema, &[batch], &layout).unwrap();
        assert_eq!((written.rows, written.min_ts, written.max_ts), (0, 0, 0));
    }
}
