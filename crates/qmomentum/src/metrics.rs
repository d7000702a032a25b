//! Metrics.

/// Index of the largest value of a row (ties: the lowest index), shared with the integer
/// runtime so float and integer predictions break ties alike.
pub use qmomentum_runtime::argmax;

/// [`argmax`] of each row of `cols` values.
pub fn argmax_rows(x: &[f32], cols: usize, out: &mut Vec<u32>) {
    out.clear();
    out.extend(x.chunks_exact(cols).map(argmax));
}

/// Number of rows whose argmax equals the label.
pub fn correct(scores: &[f32], labels: &[u32], cols: usize) -> usize {
    scores
        .chunks_exact(cols)
        .zip(labels)
        .filter(|(row, &y)| argmax(row) == y)
        .count()
}

#[cfg(test)]
mod tests {
    #[test]
    fn accuracy_counts() {
        let s = [0.1, 0.9, 0.8, 0.2, 0.5, 0.5];
        assert_eq!(super::correct(&s, &[1, 0, 1], 2), 2); // tie → first index (0) ≠ 1
    }
}
