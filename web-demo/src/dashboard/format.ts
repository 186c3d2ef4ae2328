/** A figure as the dashboard shows it: grouped digits, a fixed number of decimals, "—" for none. */
export const fmt = (v: number | null | undefined, digits = 0) =>
  v === null || v === undefined ? "—" : v.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });
