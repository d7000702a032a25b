//! Metrics.

/// Index of the largest value of each row (ties: the first).
pub fn argmax_rows(x: &[f32], cols: usize, out: &mut Vec<u32>) {
    out.clear();
    for row in x.chunks_exact(cols) {
        let mut best = 0;
        for (j, &v) in row.iter().enumerate() {
            if v > row[best] {
                best = j;
            }
        }
        out.push(best as u32);
    }
}

/// Number of rows whose argmax equals the label.
pub fn correct(scores: &[f32], labels: &[u32], cols: usize) -> usize {
    scores
        .chunks_exact(cols)
        .zip(labels)
        .filter(|(row, &y)| {
            let mut best = 0;
            for (j, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = j;
                }
            }
            best as u32 == y
        })
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
